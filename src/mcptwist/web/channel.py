# -*- test-case-name: tests.test_channel -*-
"""Receiving a request: deadlines, size limits and per-address connection caps.

L{BridgeChannel} is twisted.web's L{HTTPChannel} with the bridge's guards
against clients that hold resources without being admitted:

- Each connection counts against its client address (L{ConnectionCounter}):
  past C{limits.max_connections_per_ip} the new one is answered 429 and closed.
- A request must arrive in time: its head within C{limits.header_timeout}
  of its first byte (of the connection, for the first request), however
  slowly bytes trickle in, and its body within C{limits.body_timeout} of
  the head. Twisted's own idle timeout restarts with every byte; these do
  not. Neither applies once the request is being answered: a response
  stream (SSE) lasts as long as it needs.
- When the head has arrived, before any body byte is read, the site judges
  the request (the L{Gate<mcptwist.web.app.Gate>}'s own rules: Host, Origin,
  path, address, rate limit, credentials, grants) and gives the most body it
  may send: a refusal is answered at once, and so is a body over that limit.
  While credentials cannot be checked at once (a JWT whose keys are being
  fetched), reading stops until they have been.
- A head too large, a malformed request, or a late one gets an answer
  (431, 400, 408) with a JSON-RPC error body rather than a bare close.

Requests are parsed by llhttp, the C parser of Node.js (through httptools),
into twisted.web's own L{Request} (twisted.web's parser, in Python, cost
about 6 µs more a call: C{bench/notes.md}). The channel keeps twisted.web's rules: the head
is limited (llhttp has no limits), and what a client pipelines behind a
request being answered waits until it is (it is parsed as it comes, and its
parts are replayed in order; past a small amount the client is read no more).
An upgrade request that is not taken (one for HTTP/2, or a refused WebSocket)
is read by twisted.web's parser, which then keeps the connection: llhttp would
take its body for the new protocol's bytes.

An answer given before the request was read whole says C{Connection: close};
the rest of the request is then read and thrown away for a short while, so
that a client still sending its body can read the answer rather than a reset.

Answers leave in as few system calls as they can: a response's head waits
for its first body bytes and goes out with them, and on a plain TCP
connection whose buffer is empty the bytes are sent at once rather than at
the reactor's next turn (which would register the socket for writing, then
unregister it). What the socket does not take is buffered by Twisted as usual.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, Protocol

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
)
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, RESPONSES, HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from mcptwist.child.direct import send_now
from mcptwist.config.model import ListenerConfig
from mcptwist.config.networks import parse_ip
from mcptwist.mcp import jsonrpc
from mcptwist.security.ipfilter import rate_key

from .http import SERVER, BoundedRequest, too_large

# The HTTP versions served (llhttp also parses HTTP/0.9, which is refused).
VERSIONS: Final = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}

# How long the rest of a refused request is read (and dropped) after its answer.
LINGER: Final = 2.0
# How long a closing connection may take to send its last answer.
CLOSE_GRACE: Final = 10.0


class ConnectionCounter:
    """Open connections by client address, capped per address.

    Keys are L{rate_key}s (an IPv6 client by its /64); None (a loopback or
    Unix-socket peer, or a trusted proxy) is never counted or refused.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}

    def acquire(self, key: str | None) -> bool:
        """Count a connection from C{key}; False (nothing counted) past the limit."""
        if key is None:
            return True
        count = self.counts.get(key, 0)
        if count >= self.limit:
            return False
        self.counts[key] = count + 1
        return True

    def release(self, key: str | None) -> None:
        if key is None:
            return
        count = self.counts.get(key, 0) - 1
        if count > 0:
            self.counts[key] = count
        else:
            self.counts.pop(key, None)


def connection_key(address: object, listener: ListenerConfig | None) -> str | None:
    """Which address a connection counts against: None for a peer that is
    not limited (loopback, a Unix socket, a trusted proxy: each carries many
    clients), else its L{rate_key}."""
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    if listener is not None and listener.trusted_proxies:
        try:
            ip = parse_ip(host)
        except ValueError:
            return host
        if any(ip in network for network in listener.trusted_proxies):
            return None
    return rate_key(host)


class RequestSite(Protocol):
    """What a L{BridgeChannel} asks of its site."""

    listener: ListenerConfig | None
    connections: ConnectionCounter | None
    # The idle timeout of its connections (twisted.web's, between requests).
    timeOut: int | None
    header_timeout: float
    body_timeout: float
    preauth_body: int
    # Its open connections (closed when it stops listening: L{BridgeChannel.finish_up}).
    channels: set[BridgeChannel]

    def request_head(self, request: BoundedRequest) -> bytes | int | Deferred[None]: ...

    def refused(self, peer: str | None, reason: str) -> None: ...


class BridgeChannel(HTTPChannel):
    """An HTTP/1.1 channel that bounds what a client may hold before it is admitted."""

    site: RequestSite

    # Slots, not the instance's dict: HTTPChannel's own attributes nearly fill
    # the keys a class's instances share, and one more would give every
    # connection a dict of its own (about 1.3 KiB more for each idle stream).
    __slots__ = (
        "_body_of",
        "_buffered",
        "_closer",
        "_closing",
        "_events",
        "_first",
        "_head_size",
        "_headers",
        "_held",
        "_host",
        "_key",
        "_parser",
        "_parser_done",
        "_paused",
        "_phase",
        "_twisted",
        "_unregistered",
        "_url",
    )

    def __init__(self) -> None:
        super().__init__()
        # "head" or "body" while a request is received (and its deadline runs).
        self._phase: str | None = None
        # The request whose body is being received.
        self._body_of: BoundedRequest | None = None
        # Answered and closing: whatever else arrives is dropped.
        self._closing = False
        # The address this connection is counted against (None: not counted).
        self._key: str | None = None
        self._paused = False
        self._first = True
        self._unregistered = False
        self._closer: IDelayedCall | None = None
        self._host: IAddress | None = None
        # A response's head, until its first body bytes go out with it.
        self._held: bytes | None = None
        # The parser (made when bytes arrive), and the request it reads: its
        # target, its header fields, and the size of its head so far.
        self._parser: Any = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        # While a request is being answered, what the parser finds after it
        # (pipelined requests) waits here, in order, with the bytes it came in.
        self._events: list[tuple[Any, ...]] | None = None
        self._buffered = 0
        # The parser stopped at an upgrade: what follows is not HTTP to it.
        self._parser_done = False
        # twisted.web's own parser has the connection (after an upgrade that
        # was not taken: the rest of that request, and every later one).
        self._twisted = False

    # Connection

    def getHost(self) -> IAddress:
        """The listening address (every request asks: a system call, once here,
        after the first bytes: behind a PROXY header it is the header's)."""
        host = self._host
        if host is None:
            host = super().getHost()
            if not self._first:
                self._host = host
        return host

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)
        # The first request's head is due from the moment the client connects.
        self._start("head")
        self._count()

    def finish_up(self) -> None:
        """Its listener stops: close now if no request is under way, else
        once the requests under way are answered. (A proxy in front sees the
        connection end between requests, and sends the next on a new one.)"""
        self.persistent = False
        if not self.requests and self.transport is not None:
            self.transport.loseConnection()

    def _count(self) -> bool:
        """Count this connection against its client's address (known only
        after a PROXY header: checked again with the first bytes)."""
        counter = self.site.connections
        if counter is None or self._closing:
            return not self._closing
        assert self.transport is not None
        key = connection_key(self.transport.getPeer(), self.site.listener)
        if key == self._key:
            return True
        counter.release(self._key)
        self._key = None
        if not counter.acquire(key):
            self._refuse(key, "too_many_connections")
            self._answer(
                429,
                jsonrpc.RATE_LIMITED,
                f"Too Many Requests: your address already holds {counter.limit} connections "
                "(limits.max_connections_per_ip)",
                {b"retry-after": b"5"},
                linger=False,
            )
            return False
        self._key = key
        return True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.channels.discard(self)
        if self._key is not None and self.site.connections is not None:
            self.site.connections.release(self._key)
            self._key = None
        if self._closer is not None and self._closer.active():
            self._closer.cancel()
        self._closer = None
        self._body_of = None
        self._paused = False
        self._events = None
        super().connectionLost(reason)

    # Receiving

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._first:
            # Behind a PROXY header, the client's address is known now.
            self._first = False
            if not self._count():
                return
        if self._phase is None:
            if self._handlingRequest:
                self.resetTimeout()
            else:
                self._start("head")
        self._feed(data)

    # Parsing, with llhttp (through httptools); twisted.web's parser takes a
    # connection over only after an upgrade that was not taken (see L{_upgrade}).

    def _feed(self, data: bytes) -> None:
        events = self._events
        if events is not None:
            # HTTPChannel's rule for pipelined requests: read on (a closed
            # connection is noticed) until a small limit, then stop reading.
            self._buffered += len(data)
            if self._buffered > self._optimisticEagerReadSize and not self._waitingForTransport:
                self._networkProducer.pauseProducing()
        if self._parser_done:
            self._later(self._raw, data)
            return
        parser = self._parser
        if parser is None:
            parser = self._parser = HttpRequestParser(self)
        try:
            parser.feed_data(data)
            if events is None and self._events == []:
                # A request is being answered and nothing came after it: the
                # parser is not held meanwhile (a response stream may last
                # hours). Another is made if the client sends more.
                self._parser = None
        except HttpParserUpgrade as upgrade:
            self._parser_done = True
            rest = data[upgrade.args[0] :]
            if rest:
                self._later(self._raw, rest)
        except HttpParserCallbackError as error:
            if not isinstance(error.__context__, _Stop):
                raise
        except HttpParserError:
            self._later(self._malformed)

    def _later(self, handler: Any, *args: Any) -> None:
        """Run C{handler} now, or after the request being answered."""
        events = self._events
        if events is None:
            handler(*args)
        else:
            events.append((handler, *args))

    def _replay(self, events: list[tuple[Any, ...]]) -> None:
        """What the parser found while a request was answered, in order."""
        for index, (handler, *args) in enumerate(events):
            if self._events is not None:
                # Another request is being answered: the rest waits for it.
                self._events.extend(events[index:])
                return
            if self._closing or self.transport is None:
                return
            try:
                handler(*args)
            except _Stop:
                return

    def _raw(self, data: bytes) -> None:
        if self.transport is None:
            # A WebSocket took the connection: what came with its upgrade
            # request is not HTTP (nor frames: a client waits for the 101).
            return
        LineReceiver.dataReceived(self, data)

    def _malformed(self) -> None:
        self._respondToBadRequestAndDisconnect()

    # httptools' callbacks: each runs now, or once the request being answered
    # is (spelled out: these run for every request).

    def on_message_begin(self) -> None:
        if self._events is None:
            self._begin()
        else:
            self._events.append((self._begin,))

    def on_url(self, url: bytes) -> None:
        if self._events is None:
            self._url_part(url)
        else:
            self._events.append((self._url_part, url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._events is None:
            self._header(name, value)
        else:
            self._events.append((self._header, name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        head = (parser.get_method(), parser.get_http_version(), parser.should_upgrade())
        if self._events is None:
            self._head(*head)
        else:
            self._events.append((self._head, *head))

    def on_body(self, body: bytes) -> None:
        if self._events is None:
            self._body(body)
        else:
            self._events.append((self._body, body))

    def on_message_complete(self) -> None:
        if self._events is None:
            self._complete()
        else:
            self._events.append((self._complete,))

    def _begin(self) -> None:
        if self._closing or not self.persistent:
            # Nothing is read after a request that closes the connection.
            raise _Stop
        if self._phase is None:
            self._start("head")
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._receivedHeaderCount = 0

    def _url_part(self, part: bytes) -> None:
        if self._closing:
            raise _Stop
        self._url += part
        self._head_size += len(part)
        if len(self._url) > self.MAX_LENGTH:
            self._head_too_large(uri=True)
            raise _Stop

    def _header(self, name: bytes, value: bytes) -> None:
        if self._closing:
            raise _Stop
        line = len(name) + len(value) + 2
        self._head_size += line
        self._receivedHeaderCount += 1
        if (
            line > self.MAX_LENGTH
            or self._head_size > self.totalHeadersSize
            or self._receivedHeaderCount > self.maxHeaders
        ):
            self._head_too_large()
            raise _Stop
        self._headers.append((name, value))

    def _head(self, method: bytes, version: str, upgrade: bool) -> None:
        if self._closing:
            raise _Stop
        protocol = VERSIONS.get(version)
        if protocol is None:
            self._respondToBadRequestAndDisconnect()
            raise _Stop
        if upgrade:
            self._upgrade(method, protocol)
            return
        request = self.requestFactory(self, len(self.requests))
        self.requests.append(request)
        add = request.requestHeaders.addRawHeader
        length: int | None = 0
        for name, value in self._headers:
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding":
                # llhttp has checked that the last coding is chunked.
                length = None
            add(name, value.rstrip(b" \t"))
        self.length = length
        self._command = method
        self._path = self._url
        self._version = protocol
        self.allHeadersReceived()

    def _upgrade(self, method: bytes, protocol: bytes) -> None:
        """A request asks to upgrade: twisted.web's parser takes the connection
        over, with this request's head, as if it had read the head itself.

        llhttp would hand whatever follows the head to the new protocol,
        the request's body included; an upgrade that is not taken (not a
        WebSocket, or a refused one) must be an ordinary request instead."""
        self._twisted = True
        request = self.requestFactory(self, len(self.requests))
        self.requests.append(request)
        self._command, self._path, self._version = method, self._url, protocol
        self._receivedHeaderCount = 0
        for name, value in self._headers:
            if not self.headerReceived(name + b": " + value):
                raise _Stop
        self.allHeadersReceived()
        if self._closing:
            raise _Stop
        if self.length == 0:
            self.allContentReceived()
        else:
            self.setRawMode()

    def _body(self, data: bytes) -> None:
        if self._closing:
            raise _Stop
        self.requests[-1].handleContentChunk(data)

    def _complete(self) -> None:
        if self._twisted:
            return
        if self._closing:
            raise _Stop
        self.allContentReceived()
        if self._handlingRequest and self._events is None:
            self._events = []
            self._buffered = 0

    def _start(self, phase: str) -> None:
        """Start the deadline of a request's head or body (the idle timer stops)."""
        self._phase = phase
        self.setTimeout(self.site.header_timeout if phase == "head" else self.site.body_timeout)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._head_too_large(uri=not self.requests)

    def headerReceived(self, line: bytes) -> bool:
        if self._closing:
            return False
        if self._receivedHeaderCount >= self.maxHeaders:
            self._head_too_large()
            return False
        ok: bool = super().headerReceived(line)
        return ok

    def _head_too_large(self, uri: bool = False) -> None:
        self._refuse(self._key_for_audit(), "headers_too_large")
        if uri:
            self._answer(
                414,
                jsonrpc.INVALID_REQUEST,
                f"URI Too Long: the request line is limited to {self.MAX_LENGTH} bytes",
            )
            return
        self._answer(
            431,
            jsonrpc.INVALID_REQUEST,
            "Request Header Fields Too Large: the request head is limited to "
            f"{self.totalHeadersSize} bytes, {self.MAX_LENGTH} a line and {self.maxHeaders} headers",
        )

    def allHeadersReceived(self) -> None:
        if self._closing:
            return
        request = self.requests[-1]
        _prepare(request, self._command, self._path, self._version, self.site)
        if self.length != 0:
            self._start("body")
            self._body_of = request
            if not self._decide(request):
                return
        super().allHeadersReceived()

    def _decide(self, request: BoundedRequest) -> bool:
        """Judge a request whose body has not been read: False if it was answered."""
        head = self.site.request_head(request)
        if isinstance(head, bytes):
            self._answer_request(request, head)
            return False
        if isinstance(head, Deferred):
            # Its credentials are being checked: read no more until they have
            # been (what came with the head is held, up to the small limit).
            request.body_limit = self.site.preauth_body
            if not self._paused:
                self._paused = True
                self._networkProducer.pauseProducing()
            head.addCallback(lambda _: self._decided(request))
            return True
        request.body_limit = head
        if self.length is not None and self.length > head:
            self.body_over_limit(request)
            return False
        return True

    def _decided(self, request: BoundedRequest) -> None:
        """Credentials checked: judge again the request that waited for them."""
        if self._body_of is request and not self._closing:
            request.body_limit = self.site.preauth_body
            if not self._decide(request) or self._closing:
                return
        if self._paused:
            self._paused = False
            if not self._closing and not self._waitingForTransport and self.transport is not None:
                self._networkProducer.resumeProducing()

    def body_over_limit(self, request: BoundedRequest) -> None:
        """The body passed its limit (or says it will): 413 now."""
        if self._closing or request is not self._body_of:
            return
        self._refuse(self._key_for_audit(), "body_too_large")
        self._answer_request(request, too_large(request.body_limit).render(request))

    def allContentReceived(self) -> None:
        if self._closing:
            return
        self._body_of = None
        self._phase = None
        # HTTPChannel stops the timer next, and saves the timeout in force to
        # restore it after the answer: the idle one, not the deadline's.
        idle = self.site.timeOut
        if idle:
            # Its timer is stopped at once: no need to move it first.
            self.timeOut = idle
        elif self.timeOut != idle:
            self.setTimeout(idle)
        super().allContentReceived()

    def timeoutConnection(self) -> None:
        phase = self._phase
        if phase is None or self._closing:
            super().timeoutConnection()
            return
        key = "header_timeout" if phase == "head" else "body_timeout"
        self._refuse(self._key_for_audit(), key)
        limit = self.site.header_timeout if phase == "head" else self.site.body_timeout
        self._answer(
            408,
            jsonrpc.INVALID_REQUEST,
            f"Request Timeout: the request {phase} did not arrive within {limit:g} seconds "
            f"(limits.{key})",
            linger=False,
        )

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._closing:
            return
        if self._receivedHeaderSize > self.totalHeadersSize:
            # HTTPChannel.lineReceived counts each line of the head (with no
            # override of ours per line) and stops at the limit.
            self._head_too_large()
            return
        self._answer(400, jsonrpc.INVALID_REQUEST, "Bad Request: malformed HTTP request")

    # Answering before the request was read whole

    def _answer_request(self, request: Request, body: bytes) -> None:
        """Finish C{request} with C{body} (its status and headers already set), then close."""
        self._body_of = None
        self._stop_parsing()
        self.persistent = False
        request.setHeader(b"connection", b"close")
        request.setHeader(b"date", datetimeToString())
        if request.code not in NO_BODY_CODES:
            request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def pauseProducing(self) -> None:
        """The client reads none of our answers: read none of its requests.

        Twisted stops reading from the client only between requests, so a
        client that pipelined cheap requests (C{/health}, refusals) and read
        no answers had every answer queued in memory, without end."""
        super().pauseProducing()
        if self._handlingRequest and self.transport is not None:
            self._networkProducer.pauseProducing()

    # Sending

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """Twisted's rendering of a response's head, held for its body."""
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        self._flush()
        self._held = b"".join(head)

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            data = held + data
        send_now(self.transport, data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        held = self._held
        self._held = None
        data = b"".join(iovec)
        send_now(self.transport, data if held is None else held + data)

    def _flush(self) -> None:
        """Send a head still held (its response has no body, or ended)."""
        held = self._held
        if held is not None:
            self._held = None
            send_now(self.transport, held)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._flush()
        super().registerProducer(producer, streaming)

    def loseConnection(self) -> None:
        self._flush()
        super().loseConnection()

    def requestDone(self, request: Request) -> None:
        self._flush()
        if not self._closing:
            super().requestDone(request)
            events = self._events
            if events is not None and not self._handlingRequest:
                self._events = None
                self._replay(events)
            return
        # A request answered before it was read whole.
        del self.requests[0]
        self._linger()

    def _answer(
        self,
        status: int,
        code: int,
        message: str,
        headers: dict[bytes, bytes] | None = None,
        linger: bool = True,
    ) -> None:
        """Answer with a JSON-RPC error straight on the connection, then close."""
        if self._closing:
            return
        self._stop_parsing()
        body = jsonrpc.dumps(jsonrpc.error(None, code, message))
        lines: list[tuple[bytes, bytes]] = [
            (b"Server", SERVER),
            (b"Date", datetimeToString()),
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"%d" % len(body)),
            (b"Connection", b"close"),
            (b"X-Content-Type-Options", b"nosniff"),
            (b"Cache-Control", b"no-store"),
            *(headers or {}).items(),
        ]
        assert self.transport is not None
        self._flush()
        self.transport.writeSequence([*_head(status, lines), body])
        if linger:
            self._linger()
        else:
            self._close()

    def _stop_parsing(self) -> None:
        """Closing: parse nothing more, not even what came in the same read
        (L{dataReceived} drops what comes later)."""
        self._closing = True
        self.clearLineBuffer()

    def _linger(self) -> None:
        """Send what is written, then read and drop the rest for L{LINGER} seconds."""
        self._closing = True
        self._phase = None
        self.setTimeout(None)
        self._resume()
        self._unregister()
        transport = self.transport
        if isinstance(transport, FileDescriptor):
            # Plain TCP or Unix: the client sees the answer end (TLS cannot half-close).
            transport.loseWriteConnection()
        self._closer = self.callLater(LINGER, self._close)

    def _close(self) -> None:
        self._closing = True
        self._phase = None
        self.setTimeout(None)
        self._unregister()
        assert self.transport is not None
        self.transport.loseConnection()
        self._closer = self.callLater(CLOSE_GRACE, self._abort)

    def _unregister(self) -> None:
        """Stop being the transport's producer (as HTTPChannel does before closing)."""
        if not self._unregistered:
            self._unregistered = True
            # The transport, as a consumer (HTTPChannel registered with it).
            network: Any = self._networkProducer
            network.unregisterProducer()

    def _abort(self) -> None:
        self._closer = None
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self._networkProducer.resumeProducing()

    def _key_for_audit(self) -> str | None:
        if self.transport is None:
            return None
        host = getattr(self.transport.getPeer(), "host", None)
        return host if isinstance(host, str) else None

    def _refuse(self, peer: str | None, reason: str) -> None:
        self.site.refused(peer, reason)


class _Stop(Exception):
    """Parse no further: the connection is answered and closing."""


def _head(status: int, headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    reason = RESPONSES.get(status, b"Error")
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    lines += [name + b": " + value + b"\r\n" for name, value in headers]
    lines.append(b"\r\n")
    return lines


def _prepare(request: BoundedRequest, method: bytes, uri: bytes, version: bytes, site: Any) -> None:
    """Give a request what twisted.web sets once its body has arrived
    (method, URI, path), so that it can be judged from its head.

    Not its C{args}: twisted.web parses the query then, and the gate reads
    the one parameter it looks for from the URI (L{query_names<mcptwist.web.http.query_names>})."""
    request.method = method
    request.uri = uri
    request.clientproto = version
    request.site = site
    request.path = uri.partition(b"?")[0]


__all__ = ["BridgeChannel", "ConnectionCounter", "connection_key"]
