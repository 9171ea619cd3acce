"""The stdio side: one child process per MCP server incarnation, its line
framing, and the supervisor that keeps it running."""
