# -*- test-case-name: tests.test_tls -*-
"""The error of a certificate, key or chain that cannot be served.

Apart from L{mcptwist.security.tls}, which loads pyOpenSSL and cryptography,
so that the listeners can catch it on a bridge that serves no TLS and has not
imported them.
"""

from __future__ import annotations


class TLSLoadError(Exception):
    """A certificate, key or chain that cannot be served, and why."""

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")
