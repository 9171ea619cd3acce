# -*- test-case-name: tests.test_cluster -*-
"""Forwarding a 2026-07-28 retry to the node whose child is waiting for it.

A call that asked its client for input is parked on one node, and its
C{requestState} names that node. The balancer routes a retry without a
session anywhere; the node that gets a retry for another node forwards it
there over HTTP, once: the hop carries C{Mcp-Twist-Hop}, a MAC under the
cluster's keys of the forwarding node, the time and the body, and a node
never forwards a request that came over a genuine hop. The owner sees the
client's address in C{X-Forwarded-For} (list the nodes in its listener's
C{trusted_proxies}) and the client's own C{Host}, and checks the client's
credentials as usual. A task's requests go to the node that holds it the
same way, and a listen stream that follows tasks held on other nodes opens
a listen on each of them over a hop (L{Forwarder.open}, L{remote_tasks}).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Final, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from mcptwist.cluster.keys import HOP, ClusterKeys, b64, unb64
from mcptwist.mcp import jsonrpc

from .http import HTTPProblem


def json_error(text: str) -> bytes:
    """A JSON-RPC error body, as the admin API answers its errors."""
    return jsonrpc.dumps(jsonrpc.error(None, jsonrpc.INVALID_REQUEST, text))


log = Logger(namespace="mcptwist.cluster")

HOP_HEADER: Final = b"mcp-twist-hop"
# How long a node may take to answer an admin request sent to it. (A forwarded
# retry has no such bound here: the owner's request_timeout bounds the call.)
ADMIN_TIMEOUT: Final = 30.0
# How old a hop may be when it arrives (clocks of the nodes may differ a little).
HOP_WINDOW: Final = 60.0
# Headers that belong to one connection, or that the forwarding node sets itself.
_NOT_FORWARDED: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"x-forwarded-for",
        HOP_HEADER,
    }
)
_NOT_RETURNED: Final = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server"}
)


class NodeDirectory(Protocol):
    """Where the other nodes are: the cluster's registry."""

    def address(self, node: str) -> Deferred[str | None]:
        """The base URL a live node advertises (None: no such node now)."""

    def node_ids(self) -> Deferred[list[str]]:
        """The ids of the live nodes, this one included."""


class HTTPClient(Protocol):
    """What the forwarder needs of treq (treq itself, or a test's StubTreq)."""

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]: ...

    def collect(self, response: Any, collector: Callable[[bytes], None]) -> Deferred[None]: ...

    def content(self, response: Any) -> Deferred[bytes]: ...


class Forwarder:
    """Sends a retry to the node that holds its call, once."""

    def __init__(
        self,
        node: str,
        keys: ClusterKeys,
        clock: IReactorTime,
        directory: NodeDirectory | None = None,
        client: HTTPClient | None = None,
        timeout: float = ADMIN_TIMEOUT,
    ) -> None:
        self.node = node
        self.keys = keys
        self.clock = clock
        self.directory = directory
        self._client = client
        self.timeout = timeout

    def rekey(self, keys: ClusterKeys) -> None:
        self.keys = keys

    @property
    def client(self) -> HTTPClient:
        if self._client is None:
            import treq

            self._client = treq  # type: ignore[assignment]
        assert self._client is not None
        return self._client

    # The hop

    def _hop_data(self, node: str, when: int, body: bytes) -> bytes:
        return f"{node}.{when}.{hashlib.sha256(body).hexdigest()}".encode()

    def hop(self, body: bytes) -> bytes:
        """The header value that marks a request forwarded by this node."""
        when = int(self.clock.seconds())
        mac = self.keys.mac(HOP, self._hop_data(self.node, when, body))
        return f"{self.node}.{when}.{b64(mac)}".encode()

    def hopped_from(self, request: Request, body: bytes) -> str | None:
        """The node that forwarded this request, if it carries a genuine,
        recent hop (a forged one is ignored: the request is the client's own)."""
        values = request.requestHeaders.getRawHeaders(HOP_HEADER)
        if not values or len(values) != 1:
            return None
        try:
            node, when_text, mac = values[0].decode("ascii").split(".")
            when = int(when_text)
            given = unb64(mac)
        except ValueError:
            return None
        if abs(self.clock.seconds() - when) > HOP_WINDOW:
            return None
        if not self.keys.check(HOP, self._hop_data(node, when, body), given):
            return None
        return node

    # Forwarding

    def forward(
        self, request: Request, body: bytes, client_ip: str | None, owner: str, lost: HTTPProblem
    ) -> Deferred[None]:
        """Answer C{request} with the owner's answer to it; C{lost} if the
        owner is not in the registry or cannot be reached (its parked call is
        gone with it)."""
        return Deferred.fromCoroutine(self._forward(request, body, client_ip, owner, lost))

    async def _forward(
        self, request: Request, body: bytes, client_ip: str | None, owner: str, lost: HTTPProblem
    ) -> None:
        try:
            response = await self._post(request, body, client_ip, owner)
        except Exception as e:
            log.warn("forwarding a retry to node {owner} failed: {error}", owner=owner, error=e)
            self._finish(request, lost.render(request))
            return
        if response is None:
            log.info("a retry for node {owner}, which is not in the registry", owner=owner)
            self._finish(request, lost.render(request))
            return
        request.setResponseCode(response.code)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in _NOT_RETURNED:
                request.responseHeaders.setRawHeaders(name, values)
        finished = request.notifyFinish()
        gone: list[Failure] = []
        finished.addErrback(gone.append)

        def write(data: bytes) -> None:
            if not gone:
                request.write(data)

        try:
            await self.client.collect(response, write)
        except Exception as e:
            log.warn("the answer of node {owner} broke off: {error}", owner=owner, error=e)
        self._finish(request, b"")

    def open(
        self, request: Request, body: bytes, client_ip: str | None, node: str
    ) -> Deferred[Any | None]:
        """POST C{body} (not the client's own) to node C{node} over a hop, at
        the client's path and with its headers: the response once its head
        is in, its body left to read (None: no such node in the registry; a
        node that cannot be reached fails the Deferred)."""
        return Deferred.fromCoroutine(self._post(request, body, client_ip, node))

    async def _post(
        self, request: Request, body: bytes, client_ip: str | None, node: str
    ) -> Any | None:
        address = await self.directory.address(node) if self.directory is not None else None
        if address is None:
            return None
        return await self.client.request(
            "POST",
            address + request.uri.decode("latin-1"),
            headers=self._headers(request, body, client_ip),
            data=body,
            unbuffered=True,
        )

    def _headers(
        self, request: Request, body: bytes, client_ip: str | None
    ) -> dict[bytes, list[bytes]]:
        """The client's headers, but those of its connection, and the hop's own."""
        headers: dict[bytes, list[bytes]] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _NOT_FORWARDED:
                headers[name] = list(values)
        headers[HOP_HEADER] = [self.hop(body)]
        if client_ip is not None:
            headers[b"x-forwarded-for"] = [client_ip.encode()]
        return headers

    def relay(
        self, request: Request, body: bytes, client_ip: str | None, node: str, path: str
    ) -> Deferred[tuple[int, bytes]]:
        """Send an admin request to one node, at C{path}: its status and body
        (404 for a node not in the registry, 502 for one that cannot be reached)."""
        return Deferred.fromCoroutine(self._relay(request, body, client_ip, node, path))

    async def _relay(
        self, request: Request, body: bytes, client_ip: str | None, node: str, path: str
    ) -> tuple[int, bytes]:
        address = await self.directory.address(node) if self.directory is not None else None
        if address is None:
            return 404, json_error(f"Not Found: no node {node!r} in the cluster's registry")
        method = request.method.decode("ascii")
        try:
            response = await self.client.request(
                method,
                address + path,
                headers=self._headers(request, body, client_ip),
                data=body or None,
                timeout=self.timeout,
            )
            content = await self.client.content(response)
        except Exception as e:
            log.warn("an admin request to node {node} failed: {error}", node=node, error=e)
            return 502, json_error(f"Bad Gateway: node {node!r} did not answer ({e})")
        return int(response.code), content

    @staticmethod
    def _finish(request: Request, data: bytes) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        if data:
            request.write(data)
        request.finish()
