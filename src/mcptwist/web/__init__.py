"""The HTTP surface: the gate, the message endpoints' table, the transports, event streams."""
