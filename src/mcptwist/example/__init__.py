"""The example stdio MCP server bundled with mcptwist, and the kit it is built on."""
