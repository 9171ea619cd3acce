"""The message model: JSON-RPC messages, the error codes, and the rules of each
MCP revision. No Twisted and nothing of the bridge: every other room builds on it."""
