# -*- test-case-name: tests.test_example -*-
"""A small standard-library kit for writing stdio MCP servers.

Messages are newline-delimited JSON-RPC 2.0 on stdin/stdout (UTF-8, one
message per line); diagnostics go to stderr.  Every request runs in its own
asyncio task.  The server answers what its client asks and sends nothing of
its own accord; a server that does (notifications, requests to the client)
extends :class:`StdioServer` through :meth:`~StdioServer.send` and its hooks.

Typical use::

    server = StdioServer("demo", "1.0.0")

    @server.tool("echo", "Echo the text back.", {"type": "object", ...})
    async def echo(args: dict[str, Any], ctx: RequestContext) -> ToolReturn:
        return args["text"]

    raise SystemExit(server.run())
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TypeAlias, TypeGuard, TypeVar

from mcptwist.mcp.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
)
from mcptwist.mcp.protocol import LATEST_LEGACY as DEFAULT_PROTOCOL_VERSION
from mcptwist.mcp.protocol import LEGACY_VERSIONS as SUPPORTED_PROTOCOL_VERSIONS
from mcptwist.mcp.protocol import LOG_LEVELS

__all__ = [
    "DEFAULT_PROTOCOL_VERSION",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "LOG_LEVELS",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "SUPPORTED_PROTOCOL_VERSIONS",
    "CompletionHandler",
    "JSONObject",
    "McpError",
    "Prompt",
    "PromptArgument",
    "PromptHandler",
    "PromptReturn",
    "RequestContext",
    "RequestId",
    "Resource",
    "ResourceReader",
    "ResourceReturn",
    "StdioServer",
    "Tool",
    "ToolError",
    "ToolHandler",
    "ToolReturn",
    "base64_text",
    "check_arguments",
    "list_entry",
    "resource_contents",
    "text_content",
]

JSONObject: TypeAlias = dict[str, Any]
"""A decoded JSON object."""

RequestId: TypeAlias = str | int

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
"""Largest accepted input line, in bytes (64 MiB)."""


class McpError(Exception):
    """Raise from a handler to answer the request with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> JSONObject:
        """Return the JSON-RPC ``error`` member."""
        error: JSONObject = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class ToolError(Exception):
    """Raise from a tool handler to return an ``isError: true`` result."""


# --------------------------------------------------------------------------
# Content helpers
# --------------------------------------------------------------------------


def text_content(text: str) -> JSONObject:
    """Return a ``text`` content block."""
    return {"type": "text", "text": text}


def base64_text(data: str | bytes) -> str:
    """Base64 text of ``data`` (a string is taken as encoded already)."""
    if isinstance(data, bytes):
        return base64.b64encode(data).decode("ascii")
    return data


def resource_contents(
    uri: str, text: str | None, blob: str | bytes | None, mime_type: str | None
) -> JSONObject:
    """Return resource contents: ``blob`` (base64) if given, else ``text``."""
    contents: JSONObject = {"uri": uri}
    if mime_type is not None:
        contents["mimeType"] = mime_type
    if blob is not None:
        contents["blob"] = base64_text(blob)
    else:
        contents["text"] = text if text is not None else ""
    return contents


# --------------------------------------------------------------------------
# Minimal JSON Schema argument checking
# --------------------------------------------------------------------------

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: (
        not isinstance(v, bool)
        and (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))
    ),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def _any_type(value: Any) -> bool:
    return True


def check_arguments(schema: Mapping[str, Any], value: Any, path: str = "arguments") -> str | None:
    """Check ``value`` against a JSON Schema subset; return an error or None.

    Supported keywords: ``type``, ``enum``, ``const``, ``required``,
    ``properties``, ``additionalProperties: false``, ``items``,
    ``minLength``/``maxLength``, ``minimum``/``maximum``.  Anything else
    is accepted as is.
    """
    expected = schema.get("type")
    if isinstance(expected, str):
        expected = [expected]
    if (
        isinstance(expected, list)
        and expected
        and not any(_JSON_TYPES.get(str(t), _any_type)(value) for t in expected)
    ):
        return f"{path} must be of type {' or '.join(str(t) for t in expected)}"
    if "enum" in schema and isinstance(schema["enum"], list) and value not in schema["enum"]:
        allowed = ", ".join(json.dumps(v) for v in schema["enum"])
        return f"{path} must be one of: {allowed}"
    if "const" in schema and value != schema["const"]:
        return f"{path} must be {json.dumps(schema['const'])}"
    if isinstance(value, str):
        if isinstance(schema.get("minLength"), int) and len(value) < schema["minLength"]:
            return f"{path} must be at least {schema['minLength']} characters long"
        if isinstance(schema.get("maxLength"), int) and len(value) > schema["maxLength"]:
            return f"{path} must be at most {schema['maxLength']} characters long"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        minimum, maximum = schema.get("minimum"), schema.get("maximum")
        if isinstance(minimum, (int, float)) and value < minimum:
            return f"{path} must be >= {minimum}"
        if isinstance(maximum, (int, float)) and value > maximum:
            return f"{path} must be <= {maximum}"
    if isinstance(value, dict):
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        for name in schema.get("required", ()) or ():
            if isinstance(name, str) and name not in value:
                return f"{path}.{name} is required"
        for name, item in value.items():
            sub = properties.get(name)
            if isinstance(sub, dict):
                error = check_arguments(sub, item, f"{path}.{name}")
                if error:
                    return error
            elif schema.get("additionalProperties") is False:
                return f"{path}.{name} is not an accepted property"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            error = check_arguments(schema["items"], item, f"{path}[{index}]")
            if error:
                return error
    return None


# --------------------------------------------------------------------------
# Registrations
# --------------------------------------------------------------------------

_T = TypeVar("_T")
_MaybeAwaitable: TypeAlias = _T | Awaitable[_T]

ToolReturn: TypeAlias = str | Sequence[JSONObject] | JSONObject
"""A tool result: text, a list of content blocks, or a full ``CallToolResult``.

A dict with a ``content`` key is sent as the full result; any other dict is
sent as ``structuredContent`` (with a JSON text copy in ``content``).
"""
ToolHandler: TypeAlias = Callable[[JSONObject, "RequestContext"], _MaybeAwaitable[ToolReturn]]

ResourceReturn: TypeAlias = str | bytes | Sequence[JSONObject]
"""Resource contents: text, bytes (sent as ``blob``) or full contents objects."""
ResourceReader: TypeAlias = Callable[[str, "RequestContext"], _MaybeAwaitable[ResourceReturn]]

PromptReturn: TypeAlias = str | Sequence[JSONObject] | JSONObject
"""Prompt messages: a user text, a list of messages or a full ``GetPromptResult``."""
PromptHandler: TypeAlias = Callable[
    [dict[str, str], "RequestContext"], _MaybeAwaitable[PromptReturn]
]

CompletionHandler: TypeAlias = Callable[
    [JSONObject, JSONObject, JSONObject, "RequestContext"],
    _MaybeAwaitable[Sequence[str] | JSONObject],
]
"""``(ref, argument, context, ctx)`` to a list of values or a ``completion`` object."""


async def _resolve(value: Any) -> Any:
    """Await ``value`` if it is awaitable (handlers may be sync or async)."""
    if inspect.isawaitable(value):
        return await value
    return value


def list_entry(**fields: Any) -> JSONObject:
    """A list entry: the given fields, leaving out those that are None."""
    return {key: value for key, value in fields.items() if value is not None}


@dataclass
class Tool:
    """A registered tool."""

    name: str
    description: str
    input_schema: JSONObject
    handler: ToolHandler
    title: str | None = None
    output_schema: JSONObject | None = None
    annotations: JSONObject | None = None
    validate: bool = True

    def to_json(self) -> JSONObject:
        """Return the ``tools/list`` entry."""
        return list_entry(
            name=self.name,
            description=self.description,
            inputSchema=self.input_schema,
            title=self.title,
            outputSchema=self.output_schema,
            annotations=self.annotations,
        )


@dataclass
class Resource:
    """A registered direct resource."""

    uri: str
    name: str
    description: str
    reader: ResourceReader
    mime_type: str | None = None
    title: str | None = None

    def to_json(self) -> JSONObject:
        """Return the ``resources/list`` entry."""
        return list_entry(
            uri=self.uri,
            name=self.name,
            description=self.description,
            title=self.title,
            mimeType=self.mime_type,
        )


@dataclass
class PromptArgument:
    """An argument of a prompt."""

    name: str
    description: str | None = None
    required: bool = False

    def to_json(self) -> JSONObject:
        """Return the ``arguments`` entry."""
        return list_entry(name=self.name, required=self.required, description=self.description)


@dataclass
class Prompt:
    """A registered prompt."""

    name: str
    description: str
    handler: PromptHandler
    arguments: list[PromptArgument] = field(default_factory=list)
    title: str | None = None

    def to_json(self) -> JSONObject:
        """Return the ``prompts/list`` entry."""
        return list_entry(
            name=self.name,
            description=self.description,
            arguments=[a.to_json() for a in self.arguments],
            title=self.title,
        )


# --------------------------------------------------------------------------
# Request context
# --------------------------------------------------------------------------


class RequestContext:
    """What a handler knows about the request it serves."""

    def __init__(
        self,
        server: StdioServer,
        request_id: RequestId,
        method: str,
        params: JSONObject,
    ) -> None:
        self.server = server
        self.request_id = request_id
        self.method = method
        self.params = params


# --------------------------------------------------------------------------
# I/O plumbing
# --------------------------------------------------------------------------


class _WriteProtocol(asyncio.Protocol):
    """Flow-control aware protocol for the stdout pipe."""

    def __init__(self) -> None:
        self._paused = False
        self._waiters: list[asyncio.Future[None]] = []
        self.closed = asyncio.get_running_loop().create_future()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._wake(exc or BrokenPipeError("stdout closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _wake(self, exc: BaseException | None) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)

    async def drain(self) -> None:
        if self.closed.done():
            raise BrokenPipeError("stdout closed")
        if self._paused:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter


class _Output:
    """Writes lines to stdout: a non-blocking pipe if possible, else plain writes."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._fd: int | None = None
        self._transport: asyncio.WriteTransport | None = None
        self._protocol: _WriteProtocol | None = None

    async def open(self) -> None:
        """Attach to the stream (a duplicate of its descriptor, when it has one)."""
        loop = asyncio.get_running_loop()
        try:
            fd = self._stream.fileno()
            pipe = os.fdopen(os.dup(fd), "wb", buffering=0)
        except (OSError, ValueError):
            return  # not a real file: write to it directly
        try:
            transport, protocol = await loop.connect_write_pipe(_WriteProtocol, pipe)
        except (ValueError, OSError, NotImplementedError):
            pipe.close()  # a regular file, or no pipe support: plain writes
            return
        self._fd, self._transport, self._protocol = fd, transport, protocol

    async def write(self, data: bytes) -> None:
        """Write ``data``, waiting while the pipe is full."""
        if self._transport is None or self._protocol is None:
            self._stream.write(data)
            self._stream.flush()
            return
        if self._transport.is_closing():
            raise BrokenPipeError("stdout closed")
        self._transport.write(data)
        await self._protocol.drain()

    async def close(self, timeout: float = 2.0) -> None:
        """Flush what is buffered (bounded by ``timeout``) and detach."""
        if self._transport is None or self._protocol is None:
            with contextlib.suppress(OSError, ValueError):
                self._stream.flush()
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._protocol.drain(), timeout)
        self._transport.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._protocol.closed), timeout)
        _restore_blocking(self._fd)


class _Input:
    """A StreamReader on stdin: a non-blocking pipe if possible, else a thread."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self._stream = stream
        self._fd: int | None = None
        self._transport: asyncio.BaseTransport | None = None
        self.reader = asyncio.StreamReader(limit=limit)

    async def open(self) -> asyncio.StreamReader:
        """Start reading and return the reader."""
        loop = asyncio.get_running_loop()
        reader = self.reader
        try:
            fd = self._stream.fileno()
            pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
        except (OSError, ValueError):
            pipe = None
        if pipe is not None:
            try:
                self._transport, _ = await loop.connect_read_pipe(
                    lambda: asyncio.StreamReaderProtocol(reader), pipe
                )
                self._fd = fd
                return reader
            except (ValueError, OSError, NotImplementedError):
                pipe.close()

        read = getattr(self._stream, "read1", self._stream.read)

        def pump() -> None:
            try:
                while chunk := read(65536):
                    loop.call_soon_threadsafe(reader.feed_data, chunk)
            except (OSError, ValueError):
                pass
            finally:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(reader.feed_eof)

        threading.Thread(target=pump, name="mcp-stdin", daemon=True).start()
        return reader

    def close(self) -> None:
        """Stop reading."""
        if self._transport is not None:
            self._transport.close()
            _restore_blocking(self._fd)


def _restore_blocking(fd: int | None) -> None:
    """Leave an inherited descriptor blocking again, as other processes expect."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.set_blocking(fd, True)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _encode(message: JSONObject) -> bytes:
    try:
        text = json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: fall back to \u escapes
        text = json.dumps(message, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
        return (text + "\n").encode("ascii")


def _is_request_id(value: Any) -> TypeGuard[str | int]:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------

_F = TypeVar("_F", bound=Callable[..., Any])
_Method: TypeAlias = Callable[[RequestContext], Awaitable[JSONObject]]


class StdioServer:
    """A stdio MCP server: register tools, resources and prompts, then :meth:`run`."""

    context_class: type[RequestContext] = RequestContext
    """What each handler is given about its request."""

    list_changed = False
    """Whether the lists of tools, prompts and resources may change (a server
    that announces their changes says so)."""

    def __init__(
        self,
        name: str,
        version: str,
        *,
        title: str | None = None,
        instructions: str | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        shutdown_grace: float = 2.0,
    ) -> None:
        self.name = name
        self.version = version
        self.title = title
        self.instructions = instructions
        self.max_message_size = max_message_size
        self.shutdown_grace = shutdown_grace
        self.tools: dict[str, Tool] = {}
        self.resources: dict[str, Resource] = {}
        self.prompts: dict[str, Prompt] = {}
        self.completion_handler: CompletionHandler | None = None
        self.subscriptions: set[str] = set()
        self.log_level = "debug"
        self.client_capabilities: JSONObject = {}
        self.client_info: JSONObject = {}
        self.protocol_version: str | None = None
        self.initialized = False
        self._output: _Output | None = None
        self._in_flight: dict[RequestId, asyncio.Task[None]] = {}
        self._methods: dict[str, _Method] = {
            "initialize": self._initialize,
            "ping": self._ping,
            "logging/setLevel": self._set_level,
            "tools/list": self._list_tools,
            "tools/call": self._call_tool,
            "resources/list": self._list_resources,
            "resources/templates/list": self._list_templates,
            "resources/read": self._read_resource,
            "resources/subscribe": self._subscribe,
            "resources/unsubscribe": self._unsubscribe,
            "prompts/list": self._list_prompts,
            "prompts/get": self._get_prompt,
            "completion/complete": self._complete,
        }

    # -- registration ------------------------------------------------------

    def add_tool(self, tool: Tool) -> Tool:
        """Register a :class:`Tool` (replacing one of the same name)."""
        self.tools[tool.name] = tool
        return tool

    def tool(
        self,
        name: str,
        description: str,
        input_schema: JSONObject | None = None,
        *,
        title: str | None = None,
        output_schema: JSONObject | None = None,
        annotations: JSONObject | None = None,
        validate: bool = True,
    ) -> Callable[[_F], _F]:
        """Decorator registering ``handler(args, ctx)`` as a tool.

        ``validate`` checks the arguments against ``input_schema`` (a subset of
        JSON Schema, see :func:`check_arguments`) before calling the handler.
        """
        schema = input_schema if input_schema is not None else {"type": "object", "properties": {}}

        def register(handler: _F) -> _F:
            self.add_tool(
                Tool(
                    name,
                    description,
                    schema,
                    handler,
                    title,
                    output_schema,
                    annotations,
                    validate,
                )
            )
            return handler

        return register

    def resource(
        self,
        uri: str,
        name: str,
        description: str,
        *,
        mime_type: str | None = None,
        title: str | None = None,
    ) -> Callable[[_F], _F]:
        """Decorator registering ``reader(uri, ctx)`` as a direct resource."""

        def register(reader: _F) -> _F:
            self.resources[uri] = Resource(uri, name, description, reader, mime_type, title)
            return reader

        return register

    def prompt(
        self,
        name: str,
        description: str,
        arguments: Sequence[PromptArgument] = (),
        *,
        title: str | None = None,
    ) -> Callable[[_F], _F]:
        """Decorator registering ``handler(arguments, ctx)`` as a prompt."""

        def register(handler: _F) -> _F:
            self.prompts[name] = Prompt(name, description, handler, list(arguments), title)
            return handler

        return register

    def completion(self, handler: _F) -> _F:
        """Decorator registering the ``completion/complete`` handler.

        It is called as ``handler(ref, argument, context, ctx)``.
        """
        self.completion_handler = handler
        return handler

    def capabilities(self) -> JSONObject:
        """Return the server capabilities implied by the registrations."""
        caps: JSONObject = {"logging": {}}
        if self.completion_handler is not None:
            caps["completions"] = {}
        changes = self.list_changed
        if self.prompts:
            caps["prompts"] = {"listChanged": changes}
        if self.has_resources():
            caps["resources"] = {"subscribe": True, "listChanged": changes}
        if self.tools:
            caps["tools"] = {"listChanged": changes}
        return caps

    def has_resources(self) -> bool:
        """Whether the server offers resources (and declares the capability)."""
        return bool(self.resources)

    def find_resource(self, uri: str) -> Resource | None:
        """The resource ``uri`` names, if any."""
        return self.resources.get(uri)

    # -- outgoing messages --------------------------------------------------

    async def send(self, message: JSONObject) -> None:
        """Write one JSON-RPC message to stdout.

        Raises ``TypeError``/``ValueError`` if the message is not JSON, and
        ``OSError`` once stdout is gone.
        """
        if self._output is None:
            raise RuntimeError("the server is not running")
        await self._output.write(_encode(message))

    # -- running -------------------------------------------------------------

    def run(self) -> int:
        """Serve on the process's stdin/stdout until EOF or SIGTERM; return 0.

        ``sys.stdout`` is redirected to stderr meanwhile, so a stray ``print``
        cannot corrupt the protocol stream.
        """
        stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
        saved = sys.stdout
        sys.stdout = sys.stderr
        try:
            asyncio.run(self.serve(stdin, stdout))
        except KeyboardInterrupt:
            pass
        finally:
            sys.stdout = saved
        return 0

    async def serve(self, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        """Serve on the given binary streams until EOF or SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        self._output = _Output(stdout)
        await self._output.open()
        source = _Input(stdin, self.max_message_size + 1)
        reader = await source.open()
        stop = asyncio.Event()
        signals: list[signal.Signals] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(signum, stop.set)
                signals.append(signum)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        read_task = asyncio.create_task(self._read_loop(reader))
        stop_task = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({read_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            self._input_ended()
            # On EOF, let in-flight requests finish (briefly) so their answers go out.
            deadline = loop.time() + self.shutdown_grace
            while self._in_flight and not stop.is_set() and loop.time() < deadline:
                pending = [stop_task, *self._in_flight.values()]
                await asyncio.wait(
                    pending,
                    timeout=deadline - loop.time(),
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            for task in (read_task, stop_task, *self._in_flight.values()):
                task.cancel()
            await asyncio.gather(
                read_task, stop_task, *self._in_flight.values(), return_exceptions=True
            )
            for signum in signals:
                loop.remove_signal_handler(signum)
            source.close()
            await self._output.close()

    def _input_ended(self) -> None:
        """Nothing more will be read from the client (EOF, or the server is stopping)."""

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        while True:
            line = await self._read_line(reader)
            if line is None:
                await self._send_error(None, INVALID_REQUEST, "Message too large")
                continue
            if not line:
                return  # EOF
            if line.strip():
                await self._dispatch_line(line)

    async def _read_line(self, reader: asyncio.StreamReader) -> bytes | None:
        """Return the next line, b"" at EOF, or None for a line over the size limit."""
        try:
            return await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        except asyncio.LimitOverrunError as exc:
            to_discard = exc.consumed
        while True:  # skip the rest of the oversized line
            try:
                await reader.readexactly(to_discard)
                await reader.readuntil(b"\n")
                return None
            except asyncio.IncompleteReadError:
                return b""
            except asyncio.LimitOverrunError as exc:
                to_discard = exc.consumed

    async def _dispatch_line(self, line: bytes) -> None:
        try:
            message = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            await self._send_error(None, PARSE_ERROR, f"Parse error: {exc}")
            return
        if not isinstance(message, dict):
            detail = (
                "Batches are not supported"
                if isinstance(message, list)
                else "Expected a JSON object"
            )
            await self._send_error(None, INVALID_REQUEST, f"Invalid Request: {detail}")
            return
        if "method" in message:
            if "id" in message:
                await self._on_request(message)
            else:
                await self._on_notification(message)
        elif "id" in message and ("result" in message or "error" in message):
            request_id = message.get("id")
            if _is_request_id(request_id):
                self._on_response(request_id, message)
        else:
            request_id = message.get("id") if _is_request_id(message.get("id")) else None
            await self._send_error(request_id, INVALID_REQUEST, "Invalid Request")

    async def _on_request(self, message: JSONObject) -> None:
        request_id = message.get("id")
        method = message.get("method")
        params = message.get("params", {})
        if not _is_request_id(request_id):
            await self._send_error(
                None,
                INVALID_REQUEST,
                "Invalid Request: id must be a string or an integer",
            )
            return
        assert isinstance(request_id, (str, int))
        if (
            message.get("jsonrpc") != "2.0"
            or not isinstance(method, str)
            or not isinstance(params, dict)
        ):
            await self._send_error(request_id, INVALID_REQUEST, "Invalid Request")
            return
        if request_id in self._in_flight:
            await self._send_error(
                request_id, INVALID_REQUEST, "Invalid Request: id already in use"
            )
            return
        ctx = self.context_class(self, request_id, method, params)
        task = asyncio.create_task(self._handle_request(ctx), name=f"mcp:{method}")
        self._in_flight[request_id] = task
        task.add_done_callback(lambda _t: self._in_flight.pop(request_id, None))

    async def _handle_request(self, ctx: RequestContext) -> None:
        handler = self._methods.get(ctx.method)
        try:
            if handler is None:
                raise McpError(METHOD_NOT_FOUND, f"Method not found: {ctx.method}")
            result = await handler(ctx)
        except asyncio.CancelledError:
            return  # cancelled by the client (or shutdown): no response
        except McpError as exc:
            await self._send_error(ctx.request_id, exc.code, exc.message, exc.data)
            return
        except Exception as exc:  # a handler bug must not kill the server
            print(f"{self.name}: error in {ctx.method}: {exc!r}", file=sys.stderr)
            await self._send_error(ctx.request_id, INTERNAL_ERROR, f"Internal error: {exc}")
            return
        try:
            data = _encode({"jsonrpc": "2.0", "id": ctx.request_id, "result": result})
        except (TypeError, ValueError) as exc:
            message = f"Internal error: the result is not valid JSON: {exc}"
            await self._send_error(ctx.request_id, INTERNAL_ERROR, message)
            return
        if self._output is not None:
            with contextlib.suppress(OSError):
                await self._output.write(data)

    async def _on_notification(self, message: JSONObject) -> None:
        method = message.get("method")
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        if method == "notifications/initialized":
            self.initialized = True
        elif method == "notifications/cancelled":
            request_id = params.get("requestId")
            task = self._in_flight.get(request_id) if _is_request_id(request_id) else None
            if task is not None and task.get_name() != "mcp:initialize":
                task.cancel()

    def _on_response(self, request_id: RequestId, message: JSONObject) -> None:
        """A response from the client: this server asks nothing, so it answers nothing."""

    async def _send_error(
        self, request_id: RequestId | None, code: int, message: str, data: Any = None
    ) -> None:
        error = McpError(code, message, data).to_json()
        with contextlib.suppress(OSError, RuntimeError):
            await self.send({"jsonrpc": "2.0", "id": request_id, "error": error})

    # -- method handlers ------------------------------------------------------

    async def _initialize(self, ctx: RequestContext) -> JSONObject:
        requested = ctx.params.get("protocolVersion")
        version = (
            requested if requested in SUPPORTED_PROTOCOL_VERSIONS else DEFAULT_PROTOCOL_VERSION
        )
        assert isinstance(version, str)
        capabilities = ctx.params.get("capabilities")
        client_info = ctx.params.get("clientInfo")
        self.protocol_version = version
        self.client_capabilities = capabilities if isinstance(capabilities, dict) else {}
        self.client_info = client_info if isinstance(client_info, dict) else {}
        server_info: JSONObject = {"name": self.name, "version": self.version}
        if self.title is not None:
            server_info["title"] = self.title
        result: JSONObject = {
            "protocolVersion": version,
            "capabilities": self.capabilities(),
            "serverInfo": server_info,
        }
        if self.instructions is not None:
            result["instructions"] = self.instructions
        return result

    async def _ping(self, ctx: RequestContext) -> JSONObject:
        return {}

    async def _set_level(self, ctx: RequestContext) -> JSONObject:
        level = ctx.params.get("level")
        if level not in LOG_LEVELS:
            raise McpError(
                INVALID_PARAMS,
                f"Invalid log level: {level!r}",
                {"allowed": list(LOG_LEVELS)},
            )
        assert isinstance(level, str)
        self.log_level = level
        return {}

    def _require_capability(self, name: str, ctx: RequestContext) -> None:
        if name not in self.capabilities():
            raise McpError(METHOD_NOT_FOUND, f"Method not found: {ctx.method}")

    async def _list_tools(self, ctx: RequestContext) -> JSONObject:
        self._require_capability("tools", ctx)
        return {"tools": [t.to_json() for t in self.tools.values()]}

    async def _call_tool(self, ctx: RequestContext) -> JSONObject:
        self._require_capability("tools", ctx)
        name = ctx.params.get("name")
        arguments = ctx.params.get("arguments")
        if not isinstance(name, str):
            raise McpError(INVALID_PARAMS, "Invalid params: name must be a string")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise McpError(INVALID_PARAMS, "Invalid params: arguments must be an object")
        tool = self.tools.get(name)
        if tool is None:
            raise McpError(INVALID_PARAMS, f"Unknown tool: {name}")
        if tool.validate:
            problem = check_arguments(tool.input_schema, arguments)
            if problem is not None:
                return _tool_error(f"Invalid arguments for tool {name}: {problem}")
        try:
            value: ToolReturn = await _resolve(tool.handler(arguments, ctx))
        except McpError:
            raise
        except ToolError as exc:
            return _tool_error(str(exc))
        except Exception as exc:  # tool failures are results, not errors
            return _tool_error(str(exc) or type(exc).__name__)
        return _tool_result(value)

    async def _list_resources(self, ctx: RequestContext) -> JSONObject:
        self._require_capability("resources", ctx)
        return {"resources": [r.to_json() for r in self.resources.values()]}

    async def _list_templates(self, ctx: RequestContext) -> JSONObject:
        self._require_capability("resources", ctx)
        return {"resourceTemplates": []}

    async def _read_resource(self, ctx: RequestContext) -> JSONObject:
        self._require_capability("resources", ctx)
        uri = ctx.params.get("uri")
        if not isinstance(uri, str):
            raise McpError(INVALID_PARAMS, "Invalid params: uri must be a string")
        resource = self.find_resource(uri)
        if resource is None:
            raise McpError(INVALID_PARAMS, "Resource not found", {"uri": uri})
        value: ResourceReturn = await _resolve(resource.reader(uri, ctx))
        return {"contents": _resource_result(uri, resource.mime_type, value)}

    async def _subscribe(self, ctx: RequestContext) -> JSONObject:
        self._require_capability("resources", ctx)
        uri = ctx.params.get("uri")
        if not isinstance(uri, str):
            raise McpError(INVALID_PARAMS, "Invalid params: uri must be a string")
        self.subscriptions.add(uri)
        return {}

    async def _unsubscribe(self, ctx: RequestContext) -> JSONObject:
        self._require_capability("resources", ctx)
        uri = ctx.params.get("uri")
        if not isinstance(uri, str):
            raise McpError(INVALID_PARAMS, "Invalid params: uri must be a string")
        self.subscriptions.discard(uri)
        return {}

    async def _list_prompts(self, ctx: RequestContext) -> JSONObject:
        self._require_capability("prompts", ctx)
        return {"prompts": [p.to_json() for p in self.prompts.values()]}

    async def _get_prompt(self, ctx: RequestContext) -> JSONObject:
        self._require_capability("prompts", ctx)
        name = ctx.params.get("name")
        arguments = ctx.params.get("arguments")
        if not isinstance(name, str):
            raise McpError(INVALID_PARAMS, "Invalid params: name must be a string")
        arguments = arguments if arguments is not None else {}
        if not isinstance(arguments, dict) or not all(
            isinstance(v, str) for v in arguments.values()
        ):
            raise McpError(INVALID_PARAMS, "Invalid params: arguments must map names to strings")
        prompt = self.prompts.get(name)
        if prompt is None:
            raise McpError(INVALID_PARAMS, f"Unknown prompt: {name}")
        missing = [a.name for a in prompt.arguments if a.required and a.name not in arguments]
        if missing:
            raise McpError(INVALID_PARAMS, f"Missing required arguments: {', '.join(missing)}")
        value: PromptReturn = await _resolve(prompt.handler(arguments, ctx))
        if isinstance(value, str):
            return {
                "description": prompt.description,
                "messages": [{"role": "user", "content": text_content(value)}],
            }
        if isinstance(value, dict):
            return value
        return {"description": prompt.description, "messages": list(value)}

    async def _complete(self, ctx: RequestContext) -> JSONObject:
        handler = self.completion_handler
        if handler is None:
            raise McpError(METHOD_NOT_FOUND, f"Method not found: {ctx.method}")
        ref = ctx.params.get("ref")
        argument = ctx.params.get("argument")
        context = ctx.params.get("context")
        if not isinstance(ref, dict) or not isinstance(argument, dict):
            raise McpError(INVALID_PARAMS, "Invalid params: ref and argument must be objects")
        value = await _resolve(
            handler(ref, argument, context if isinstance(context, dict) else {}, ctx)
        )
        if isinstance(value, dict):
            return {"completion": value}
        values = [str(v) for v in value]
        return {
            "completion": {
                "values": values[:100],
                "total": len(values),
                "hasMore": len(values) > 100,
            }
        }


def _tool_error(message: str) -> JSONObject:
    return {"content": [text_content(message)], "isError": True}


def _tool_result(value: ToolReturn) -> JSONObject:
    if isinstance(value, str):
        return {"content": [text_content(value)]}
    if isinstance(value, dict):
        if "content" in value:
            return value
        text = json.dumps(value, ensure_ascii=False, default=str)
        return {"content": [text_content(text)], "structuredContent": value}
    return {"content": list(value)}


def _resource_result(uri: str, mime_type: str | None, value: ResourceReturn) -> list[JSONObject]:
    if isinstance(value, str):
        return [resource_contents(uri, value, None, mime_type)]
    if isinstance(value, bytes):
        return [resource_contents(uri, None, value, mime_type)]
    return list(value)
