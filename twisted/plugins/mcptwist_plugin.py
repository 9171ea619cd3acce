# -*- test-case-name: tests.test_tap -*-
"""twistd plugin: ``twistd -n --pidfile= mcpbridge [--config FILE]``.

The real work lives in L{mcptwist.tap}; this file only names it, so that
plugin discovery stays fast and an import error there cannot hide the plugin.
"""

from twisted.application.service import ServiceMaker

mcpbridge = ServiceMaker(
    "mcptwist MCP bridge",
    "mcptwist.tap",
    "Supervise stdio MCP servers and serve them over Streamable HTTP and HTTP+SSE.",
    "mcpbridge",
)
