"""The HTTP surface: the Klein app, one module per transport, event streams."""
