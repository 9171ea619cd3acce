# -*- test-case-name: tests.test_example -*-
"""The built-in example MCP server, "mcptwist-example".

A handful of small, dependable utilities: time zones, arithmetic, hashing,
encodings and UUIDs, plus one resource and one prompt.  Run it with
``python -m mcptwist.example``.
"""

from __future__ import annotations

import ast
import base64
import binascii
import datetime as dt
import hashlib
import math
import operator
import urllib.parse
import uuid as uuid_module
import zoneinfo
from collections.abc import Callable
from importlib import metadata

from mcptwist.example.kit import (
    JSONObject,
    PromptArgument,
    RequestContext,
    StdioServer,
    ToolError,
)

__all__ = [
    "CalculationError",
    "build_server",
    "convert_time",
    "current_time",
    "decode_text",
    "encode_text",
    "evaluate",
    "hash_text",
    "main",
]

SERVER_NAME = "mcptwist-example"

# --------------------------------------------------------------------------
# Calculator
# --------------------------------------------------------------------------

MAX_EXPRESSION_LENGTH = 2000
MAX_DEPTH = 64
MAX_INT_BITS = 13_000  # about 3,900 digits: cheap, and under int->str limits
MAX_FACTORIAL = 1000

Number = int | float


class CalculationError(ValueError):
    """The expression is invalid, unsupported, or its value cannot be computed."""


def _check_int(value: Number) -> Number:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculationError("result too large")
    return value


def _pow(base: Number, exponent: Number) -> Number:
    if isinstance(base, int) and isinstance(exponent, int):
        if exponent < 0:
            if base == 0:
                raise CalculationError("division by zero")
            return _finite(float(base) ** exponent)
        if abs(base) > 1 and exponent * (abs(base).bit_length() - 1) > MAX_INT_BITS:
            raise CalculationError("result too large")
        return _check_int(base**exponent)
    result: object = float(base) ** float(exponent)
    if not isinstance(result, float):  # a negative base to a fractional power
        raise CalculationError("result is not a real number")
    return result


def _mul(left: Number, right: Number) -> Number:
    if (
        isinstance(left, int)
        and isinstance(right, int)
        and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1
    ):
        raise CalculationError("result too large")
    return left * right


def _factorial(value: Number) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise CalculationError("factorial() needs a whole number")
        value = int(value)
    if value < 0:
        raise CalculationError("factorial() needs a non-negative number")
    if value > MAX_FACTORIAL:
        raise CalculationError(f"factorial() is limited to {MAX_FACTORIAL}")
    return math.factorial(value)


def _round(value: Number, digits: Number = 0) -> Number:
    if not isinstance(digits, int):
        raise CalculationError("round() needs a whole number of digits")
    if abs(digits) > 100:
        raise CalculationError("round() digits must be between -100 and 100")
    return round(value, digits) if digits else round(value)


_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: _mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _pow,
}

_FUNCTIONS: dict[str, Callable[..., Number]] = {
    "abs": abs,
    "round": _round,
    "floor": math.floor,
    "ceil": math.ceil,
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log": math.log,
    "log2": math.log2,
    "log10": math.log10,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "atan2": math.atan2,
    "sinh": math.sinh,
    "cosh": math.cosh,
    "tanh": math.tanh,
    "hypot": math.hypot,
    "degrees": math.degrees,
    "radians": math.radians,
    "factorial": _factorial,
    "min": min,
    "max": max,
}

_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _finite(value: Number) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculationError("result is not a finite number")
    return value


def _eval(node: ast.AST, depth: int) -> Number:
    if depth > MAX_DEPTH:
        raise CalculationError("expression is nested too deeply")
    if isinstance(node, ast.Expression):
        return _eval(node.body, depth + 1)
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CalculationError(f"unsupported literal: {value!r}")
        return _finite(_check_int(value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = _eval(node.operand, depth + 1)
        return -operand if isinstance(node.op, ast.USub) else +operand
    if isinstance(node, ast.BinOp):
        function = _BINARY.get(type(node.op))
        if function is None:
            hint = " (use ** for powers)" if isinstance(node.op, ast.BitXor) else ""
            raise CalculationError(f"unsupported operator{hint}")
        left = _eval(node.left, depth + 1)
        right = _eval(node.right, depth + 1)
        return _finite(_check_int(function(left, right)))
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise CalculationError(f"unknown name: {node.id}")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            raise CalculationError("unknown function")
        if node.keywords:
            raise CalculationError("keyword arguments are not supported")
        if any(isinstance(arg, ast.Starred) for arg in node.args):
            raise CalculationError("unsupported argument")
        args = [_eval(arg, depth + 1) for arg in node.args]
        try:
            result = _FUNCTIONS[node.func.id](*args)
        except TypeError as exc:
            raise CalculationError(f"{node.func.id}(): {exc}") from None
        return _finite(_check_int(result))
    raise CalculationError(f"unsupported syntax: {type(node).__name__}")


def evaluate(expression: str) -> Number:
    """Evaluate an arithmetic expression safely (no ``eval``).

    Supports numbers, ``+ - * / // % **``, parentheses, unary minus/plus,
    the constants ``pi``, ``e`` and ``tau`` and a few functions (``sqrt``,
    ``log``, ``sin``, ...).  Results are bounded in size.  Raises
    :class:`CalculationError`, and nothing else, for any bad input.
    """
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise CalculationError(f"expression is longer than {MAX_EXPRESSION_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        message = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        raise CalculationError(f"invalid expression: {message}") from None
    try:
        return _eval(tree, 0)
    except CalculationError:
        raise
    except ZeroDivisionError:
        raise CalculationError("division by zero") from None
    except OverflowError:
        raise CalculationError("result too large") from None
    except (ValueError, ArithmeticError, RecursionError, MemoryError) as exc:
        raise CalculationError(f"cannot compute: {exc}") from None


# --------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------


def _zone(name: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ToolError(
            f"Unknown timezone {name!r}: use an IANA name such as "
            "'Europe/Paris', 'America/New_York' or 'UTC'."
        ) from None


def _describe(moment: dt.datetime, zone_name: str) -> JSONObject:
    offset = moment.utcoffset() or dt.timedelta(0)
    return {
        "timezone": zone_name,
        "datetime": moment.isoformat(timespec="seconds"),
        "day_of_week": moment.strftime("%A"),
        "utc_offset": _format_offset(offset),
        "is_dst": bool(moment.dst()),
    }


def _format_offset(offset: dt.timedelta) -> str:
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


def current_time(timezone: str = "UTC", now: dt.datetime | None = None) -> JSONObject:
    """Describe the current time in an IANA time zone."""
    zone = _zone(timezone)
    moment = (now or dt.datetime.now(dt.UTC)).astimezone(zone)
    return _describe(moment, timezone)


def convert_time(
    time: str,
    source_timezone: str,
    target_timezone: str,
    today: dt.date | None = None,
) -> JSONObject:
    """Convert ``time`` (``HH:MM`` or ISO 8601) between two IANA time zones.

    A time without a date is taken on today's date in the source zone; a time
    with a UTC offset is converted from that offset.
    """
    source, target = _zone(source_timezone), _zone(target_timezone)
    text = time.strip()
    try:
        if "T" in text or " " in text or len(text) > 8:
            moment = dt.datetime.fromisoformat(text)
        else:
            clock = dt.time.fromisoformat(text)
            day = today or dt.datetime.now(source).date()
            moment = dt.datetime.combine(day, clock)
    except ValueError:
        raise ToolError(
            f"Invalid time {time!r}: use 24-hour 'HH:MM' or an ISO 8601 date-time "
            "such as '2025-06-01T14:30'."
        ) from None
    # A naive time is local to the source zone; an aware one is converted.
    moment = moment.replace(tzinfo=source) if moment.tzinfo is None else moment.astimezone(source)
    converted = moment.astimezone(target)
    difference = (converted.utcoffset() or dt.timedelta(0)) - (
        moment.utcoffset() or dt.timedelta(0)
    )
    hours = difference.total_seconds() / 3600
    return {
        "source": _describe(moment, source_timezone),
        "target": _describe(converted, target_timezone),
        "time_difference": f"{hours:+g}h",
    }


# --------------------------------------------------------------------------
# Hashing and encodings
# --------------------------------------------------------------------------

HASH_ALGORITHMS = ("sha256", "sha1", "md5", "sha512", "sha3_256", "blake2b")
ENCODINGS = ("base64", "base64url", "hex", "url")


def hash_text(text: str, algorithm: str = "sha256") -> str:
    """Return the hex digest of the UTF-8 bytes of ``text``."""
    if algorithm not in HASH_ALGORITHMS:
        raise ToolError(f"Unsupported algorithm {algorithm!r}")
    return hashlib.new(algorithm, text.encode("utf-8")).hexdigest()


def encode_text(text: str, encoding: str) -> str:
    """Encode the UTF-8 bytes of ``text`` as base64, base64url, hex or URL."""
    data = text.encode("utf-8")
    if encoding == "base64":
        return base64.b64encode(data).decode("ascii")
    if encoding == "base64url":
        return base64.urlsafe_b64encode(data).decode("ascii")
    if encoding == "hex":
        return data.hex()
    if encoding == "url":
        return urllib.parse.quote(text, safe="")
    raise ToolError(f"Unsupported encoding {encoding!r}")


def decode_text(text: str, encoding: str) -> str:
    """Decode base64, base64url, hex or URL text back to a UTF-8 string."""
    try:
        if encoding == "url":
            return urllib.parse.unquote(text, errors="strict")
        stripped = "".join(text.split())
        if encoding == "base64":
            data = base64.b64decode(_pad(stripped), validate=True)
        elif encoding == "base64url":
            data = base64.urlsafe_b64decode(_pad(stripped))
            if base64.urlsafe_b64encode(data).rstrip(b"=") != stripped.rstrip("=").encode("ascii"):
                raise ValueError("invalid base64url characters")
        elif encoding == "hex":
            data = bytes.fromhex(stripped)
        else:
            raise ToolError(f"Unsupported encoding {encoding!r}")
    except (binascii.Error, ValueError) as exc:
        if isinstance(exc, UnicodeDecodeError):
            raise ToolError("The decoded bytes are not valid UTF-8 text") from None
        raise ToolError(f"Invalid {encoding} input: {exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolError(
            f"The decoded bytes are not valid UTF-8 text (hex: {data.hex()[:200]})"
        ) from None


def _pad(text: str) -> str:
    return text + "=" * (-len(text) % 4)


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------

_TIMEZONE_SCHEMA: JSONObject = {
    "type": "string",
    "description": "IANA time zone name, e.g. 'Europe/Paris' or 'UTC'.",
    "minLength": 1,
}

_MOMENT_SCHEMA: JSONObject = {
    "type": "object",
    "properties": {
        "timezone": {"type": "string"},
        "datetime": {"type": "string", "description": "ISO 8601 date-time"},
        "day_of_week": {"type": "string"},
        "utc_offset": {"type": "string", "description": "e.g. +02:00"},
        "is_dst": {"type": "boolean"},
    },
    "required": ["timezone", "datetime", "day_of_week", "utc_offset", "is_dst"],
}

_TEXT_SCHEMA: JSONObject = {"type": "string", "description": "The input text."}


def _version() -> str:
    try:
        return metadata.version("mcptwist")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def build_server() -> StdioServer:
    """Create the example server with all its tools, resource and prompt."""
    server = StdioServer(
        SERVER_NAME,
        _version(),
        title="mcptwist example utilities",
        instructions=(
            "Utility tools: current time and time zone conversion (IANA names), "
            "a safe calculator, text hashing, base64/hex/URL encoding, and UUIDs."
        ),
    )
    read_only = {"readOnlyHint": True, "openWorldHint": False}

    @server.tool(
        "current_time",
        "Get the current date and time in an IANA time zone (ISO 8601).",
        {
            "type": "object",
            "properties": {"timezone": {**_TIMEZONE_SCHEMA, "default": "UTC"}},
            "additionalProperties": False,
        },
        title="Current time",
        output_schema=_MOMENT_SCHEMA,
        annotations={**read_only, "idempotentHint": False},
    )
    def _current_time(args: JSONObject, ctx: RequestContext) -> JSONObject:
        return current_time(args.get("timezone", "UTC"))

    @server.tool(
        "convert_time",
        "Convert a time between two IANA time zones. `time` is 24-hour 'HH:MM' "
        "(today's date) or an ISO 8601 date-time.",
        {
            "type": "object",
            "properties": {
                "time": {
                    "type": "string",
                    "description": "'HH:MM' (24-hour) or ISO 8601, e.g. '2025-06-01T14:30'.",
                },
                "source_timezone": _TIMEZONE_SCHEMA,
                "target_timezone": _TIMEZONE_SCHEMA,
            },
            "required": ["time", "source_timezone", "target_timezone"],
            "additionalProperties": False,
        },
        title="Convert time",
        output_schema={
            "type": "object",
            "properties": {
                "source": _MOMENT_SCHEMA,
                "target": _MOMENT_SCHEMA,
                "time_difference": {"type": "string", "description": "e.g. +5.5h"},
            },
            "required": ["source", "target", "time_difference"],
        },
        annotations={**read_only, "idempotentHint": True},
    )
    def _convert_time(args: JSONObject, ctx: RequestContext) -> JSONObject:
        return convert_time(args["time"], args["source_timezone"], args["target_timezone"])

    @server.tool(
        "calculate",
        "Evaluate an arithmetic expression: numbers, + - * / // % **, "
        "parentheses, pi, e, tau and functions abs, round, floor, ceil, sqrt, exp, "
        "log(x[, base]), log2, log10, sin, cos, tan, asin, acos, atan, atan2, "
        "sinh, cosh, tanh, hypot, degrees, radians, factorial, min, max. "
        "Angles are in radians.",
        {
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "description": "For example '2 * (3 + 4) ** 2 / sqrt(16)'.",
                    "minLength": 1,
                    "maxLength": MAX_EXPRESSION_LENGTH,
                }
            },
            "required": ["expression"],
            "additionalProperties": False,
        },
        title="Calculator",
        annotations={**read_only, "idempotentHint": True},
    )
    def _calculate(args: JSONObject, ctx: RequestContext) -> str:
        try:
            return str(evaluate(args["expression"]))
        except CalculationError as exc:
            raise ToolError(f"Cannot evaluate expression: {exc}") from None

    @server.tool(
        "hash_text",
        "Hash the UTF-8 bytes of a text; returns the hex digest.",
        {
            "type": "object",
            "properties": {
                "text": _TEXT_SCHEMA,
                "algorithm": {
                    "type": "string",
                    "enum": list(HASH_ALGORITHMS),
                    "default": "sha256",
                },
            },
            "required": ["text"],
            "additionalProperties": False,
        },
        title="Hash text",
        annotations={**read_only, "idempotentHint": True},
    )
    def _hash_text(args: JSONObject, ctx: RequestContext) -> str:
        return hash_text(args["text"], args.get("algorithm", "sha256"))

    @server.tool(
        "uuid",
        "Generate random (version 4) UUIDs, one per line.",
        {
            "type": "object",
            "properties": {
                "count": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 100,
                    "default": 1,
                    "description": "How many UUIDs to generate.",
                }
            },
            "additionalProperties": False,
        },
        title="UUID",
        annotations={**read_only, "idempotentHint": False},
    )
    def _uuid(args: JSONObject, ctx: RequestContext) -> str:
        count = int(args.get("count", 1))
        return "\n".join(str(uuid_module.uuid4()) for _ in range(count))

    encoding_schema: JSONObject = {
        "type": "string",
        "enum": list(ENCODINGS),
        "description": "base64, base64url, hex or url (percent-encoding).",
    }
    codec_schema: JSONObject = {
        "type": "object",
        "properties": {"text": _TEXT_SCHEMA, "encoding": encoding_schema},
        "required": ["text", "encoding"],
        "additionalProperties": False,
    }

    @server.tool(
        "encode",
        "Encode a text (its UTF-8 bytes) as base64, base64url, hex or URL percent-encoding.",
        codec_schema,
        title="Encode text",
        annotations={**read_only, "idempotentHint": True},
    )
    def _encode(args: JSONObject, ctx: RequestContext) -> str:
        return encode_text(args["text"], args["encoding"])

    @server.tool(
        "decode",
        "Decode base64, base64url, hex or URL percent-encoded text back to UTF-8 text.",
        codec_schema,
        title="Decode text",
        annotations={**read_only, "idempotentHint": True},
    )
    def _decode(args: JSONObject, ctx: RequestContext) -> str:
        return decode_text(args["text"], args["encoding"])

    @server.resource(
        "mcptwist://about",
        "about",
        "What this server is and which tools it offers.",
        mime_type="text/markdown",
        title="About mcptwist-example",
    )
    def _about(uri: str, ctx: RequestContext) -> str:
        lines = [
            f"# {SERVER_NAME} {server.version}",
            "",
            "The default stdio MCP server bundled with mcptwist, a Twisted bridge",
            "that serves stdio MCP servers over HTTP.",
            "",
            "## Tools",
            "",
        ]
        lines += [f"- `{t.name}`: {t.description}" for t in server.tools.values()]
        lines += ["", "## Prompts", ""]
        lines += [f"- `{p.name}`: {p.description}" for p in server.prompts.values()]
        return "\n".join(lines) + "\n"

    @server.prompt(
        "world_clock",
        "Ask for the current time in several time zones.",
        [
            PromptArgument(
                "timezones",
                "Comma-separated IANA time zone names, e.g. 'Europe/Paris, Asia/Tokyo'.",
                required=True,
            )
        ],
        title="World clock",
    )
    def _world_clock(args: dict[str, str], ctx: RequestContext) -> str:
        zones = [z.strip() for z in args["timezones"].split(",") if z.strip()]
        listing = ", ".join(zones) if zones else "UTC"
        return (
            f"What time is it now in each of these time zones: {listing}? "
            "Use the current_time tool once per zone and answer with a short table "
            "of zone, local time and UTC offset."
        )

    @server.completion
    def _complete(
        ref: JSONObject, argument: JSONObject, context: JSONObject, ctx: RequestContext
    ) -> list[str]:
        names = {"timezone", "timezones", "source_timezone", "target_timezone"}
        if argument.get("name") not in names:
            return []
        value = str(argument.get("value", ""))
        head, _, last = value.rpartition(",")
        prefix = f"{head}, " if head else ""
        needle = last.strip().lower()
        zones = sorted(zoneinfo.available_timezones())
        return [prefix + z for z in zones if z.lower().startswith(needle)]

    return server


def main() -> int:
    """Run the example server on stdin/stdout."""
    return build_server().run()
