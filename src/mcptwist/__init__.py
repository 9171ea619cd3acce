"""mcptwist: serve stdio MCP servers over Streamable HTTP and HTTP+SSE.

How a message flows, module by module::

    client -> web.app (HTTP, origin check) -> web.streamable | web.legacy_sse
           -> session (one client session) -> routing (id rewrite, routing)
           -> supervisor / process (the child, line-framed by framing) -> MCP server
    MCP server -> process -> routing -> session -> web.sse (event stream) -> client
"""

__version__ = "0.1.0"
