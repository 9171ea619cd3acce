"""The core: client sessions and stateless calls on one side, a child on the
other, and the multiplexer between them (ids, progress, cancellation,
server-to-client requests, timeouts). It reports what happens to an injected
recorder and knows nothing of HTTP."""
