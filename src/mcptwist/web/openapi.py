# -*- test-case-name: tests.test_rest -*-
"""A server's tools as a REST API: the OpenAPI document, the arguments'
check and the answer made of a tool's result.

Nothing here touches HTTP or the router: L{rest<mcptwist.web.rest>} serves
C{POST /servers/NAME/tools/TOOL} and C{GET /servers/NAME/openapi.json} with
these rules, so they can be tested (and property-tested) on their own.

Each tool is one operation, C{POST /tools/TOOL}, whose C{operationId} is the
tool's name (how Open WebUI's OpenAPI tool servers call it) and whose body is
the tool's arguments. A tool's schemas are embedded where OpenAPI reads them
(the request body, the 200 response); a local C{$ref} of a schema (C{#/$defs/X})
is rewritten to point at the same place inside the document, so that any
resolver finds it from the document's root.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

import orjson

from mcptwist.mcp import jsonrpc

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

OPENAPI_VERSION: Final = "3.1.0"
# A tool is served only if its name is one path segment the gate takes as it
# is: no escapes, no dot segments. MCP's own rule for names (letters, digits,
# "_", "-", ".") fits within it.
_PATH_SAFE: Final = re.compile(r"[A-Za-z0-9_.~-]{1,128}")
# The most validation errors told of one call.
MAX_ERRORS: Final = 20

# The body of every error answer: the bridge's JSON-RPC error envelope, whose
# "error" object holds a code, a message and, for some, data.
ERROR_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "integer", "description": "The JSON-RPC error code"},
                "message": {"type": "string"},
                "data": {
                    "description": "For 422, {errors: [{path, message}]}; for a tool's own "
                    "error (isError), {content: [...]}, the tool's content"
                },
            },
        }
    },
}
_ERRORS: Final = {
    "401": "Credentials are missing or not valid",
    "403": "This client may not use this server",
    "404": "No such tool (or one this client may not see)",
    "422": "The arguments do not match the tool's input schema",
    "429": "A rate limit or a cap: retry after Retry-After seconds",
    "500": "The tool ran and reported an error (isError)",
    "501": "The tool asked its client a question (elicitation, sampling, roots), "
    "which a REST call cannot answer: call it over MCP",
    "502": "The MCP server failed the request",
    "503": "The MCP server is not available now",
    "504": "The MCP server did not answer in time (request_timeout)",
}

# A JSON-RPC error code's status, in a REST answer (any other: 502).
STATUS_OF_CODE: Final[Mapping[int, int]] = {
    jsonrpc.METHOD_NOT_FOUND: 404,
    jsonrpc.INVALID_PARAMS: 422,
    jsonrpc.SERVER_UNAVAILABLE: 503,
    jsonrpc.REQUEST_TIMEOUT: 504,
    jsonrpc.MISSING_CAPABILITY: 501,
    jsonrpc.REQUEST_CANCELLED: 503,
}


def served(name: object) -> bool:
    """Whether a tool of this name can be served as C{/tools/NAME}."""
    return isinstance(name, str) and bool(_PATH_SAFE.fullmatch(name)) and name not in (".", "..")


def served_tools(tools: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """The tools that can be served, by name (the first of a repeated name)."""
    found: dict[str, dict[str, Any]] = {}
    for tool in tools:
        if isinstance(tool, dict) and served(tool.get("name")) and tool["name"] not in found:
            found[tool["name"]] = tool
    return found


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _relocated(schema: Any, base: str) -> Any:
    """A schema with its local references (C{#...}) made relative to C{base},
    the place it takes in the document (a schema with an C{$id} is its own
    resource, and keeps them)."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                fragment = ref[1:]
                out["$ref"] = base + fragment if fragment.startswith("/") or not fragment else ref
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    if isinstance(schema, dict) and "$id" in schema:
        return schema
    return walk(schema)


def _schema(value: Any) -> dict[str, Any] | None:
    """A tool's schema, if it is one a validator takes, whose references all
    lead somewhere inside it (not, through references alone, back to
    themselves: no validator or resolver gets out of such a loop)."""
    if not isinstance(value, dict) or _bad_refs(value):
        return None
    from jsonschema.exceptions import SchemaError

    try:
        validator_class(value).check_schema(value)
    except (SchemaError, RecursionError):
        return None
    return value


def _resolve(root: Any, fragment: str) -> Any:
    """The node a local reference's JSON pointer names in C{root} (None: none)."""
    node = root
    for raw in fragment.split("/")[1:] if fragment else []:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _bad_refs(root: dict[str, Any]) -> bool:
    """Whether a reference in the schema is not a JSON pointer into it, or
    names nothing there, or a chain of them comes back to where it started."""
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        stack.extend(node.values())
        seen: set[int] = set()
        current: Any = node
        while isinstance(current, dict) and isinstance(current.get("$ref"), str):
            ref = current["$ref"]
            if not ref.startswith("#") or (len(ref) > 1 and ref[1] != "/"):
                # Another document, or an anchor: not one to embed as it is.
                return True
            if id(current) in seen:
                return True
            seen.add(id(current))
            current = _resolve(root, ref[1:])
            if current is None:
                return True
    return False


def validator_class(schema: dict[str, Any]) -> type[Validator]:
    """The validator of the schema's C{$schema} dialect (2020-12 unless it names another).

    jsonschema is imported on first use: a bridge whose REST face is never
    called does not load it."""
    import jsonschema.validators

    found: type[Validator] = jsonschema.validators.validator_for(
        schema, default=jsonschema.validators.Draft202012Validator
    )
    return found


def operation(tool: dict[str, Any], secured: bool) -> dict[str, Any]:
    """The operation that calls one tool."""
    name = tool["name"]
    path = "/tools/" + name
    description = tool.get("description")
    annotations = tool.get("annotations")
    title = tool.get("title")
    if not isinstance(title, str) and isinstance(annotations, dict):
        title = annotations.get("title")
    op: dict[str, Any] = {"operationId": name}
    if isinstance(title, str) and title:
        op["summary"] = title
    op["description"] = description if isinstance(description, str) and description else name
    body_at = _pointer("paths", path, "post", "requestBody", "content", "application/json")
    input_schema = _schema(tool.get("inputSchema"))
    body = (
        _relocated(input_schema, body_at + "/schema")
        if input_schema is not None
        else {"type": "object"}
    )
    op["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": body}},
    }
    output_schema = _schema(tool.get("outputSchema"))
    if output_schema is not None:
        answer_at = _pointer(
            "paths", path, "post", "responses", "200", "content", "application/json"
        )
        result = {
            "description": "The tool's structured result",
            "content": {
                "application/json": {"schema": _relocated(output_schema, answer_at + "/schema")}
            },
        }
    else:
        result = {
            "description": "The tool's result: the JSON its one text item holds, that "
            "text as a string, or its content items",
            "content": {"application/json": {"schema": {}}},
        }
    responses: dict[str, Any] = {"200": result}
    for status in _ERRORS:
        if status == "401" and not secured:
            continue
        responses[status] = {"$ref": f"#/components/responses/E{status}"}
    op["responses"] = responses
    return op


def document(
    server: str,
    base: str,
    tools: Iterable[Any],
    secured: bool,
    info: Mapping[str, Any] | None = None,
    instructions: str | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a server's tools, served under C{base}
    (C{/servers/NAME}); C{secured}: every call needs a bearer token."""
    version = (info or {}).get("version")
    doc_info: dict[str, Any] = {
        "title": f"{server}: MCP tools",
        "version": version if isinstance(version, str) and version else "unknown",
    }
    if instructions:
        doc_info["description"] = instructions
    paths = {
        "/tools/" + name: {"post": operation(tool, secured)}
        for name, tool in served_tools(tools).items()
    }
    components: dict[str, Any] = {
        "schemas": {"Error": ERROR_SCHEMA},
        "responses": {
            f"E{status}": {
                "description": text,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
            for status, text in _ERRORS.items()
            if status != "401" or secured
        },
    }
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": doc_info,
        "servers": [{"url": base}],
        "paths": paths,
        "components": components,
    }
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


@functools.lru_cache(maxsize=512)
def _validator(schema_json: bytes) -> Validator | None:
    schema = orjson.loads(schema_json)
    if _schema(schema) is None:
        return None
    return validator_class(schema)(schema)


# Each schema's validator, by the schema object itself: a kept tools list
# hands the same one to every call, so it is not serialised again to find
# it. The schema is held with it, so that its id is not reused meanwhile.
_BY_OBJECT: dict[int, tuple[dict[str, Any], Validator | None]] = {}
_BY_OBJECT_SIZE: Final = 512


def _validator_of(schema: dict[str, Any]) -> Validator | None:
    kept = _BY_OBJECT.get(id(schema))
    if kept is not None and kept[0] is schema:
        return kept[1]
    try:
        validator = _validator(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))
    except (TypeError, orjson.JSONEncodeError):
        validator = None
    if len(_BY_OBJECT) >= _BY_OBJECT_SIZE:
        del _BY_OBJECT[next(iter(_BY_OBJECT))]
    _BY_OBJECT[id(schema)] = (schema, validator)
    return validator


def argument_errors(tool: dict[str, Any], arguments: Any) -> list[dict[str, str]]:
    """What is wrong with a call's arguments, by the tool's input schema (each
    error's JSON pointer and message; none if the schema is not one a
    validator takes: the child checks them itself)."""
    schema = tool.get("inputSchema")
    if not isinstance(schema, dict):
        return []
    validator = _validator_of(schema)
    if validator is None:
        return []
    from referencing.exceptions import Unresolvable

    try:
        found = sorted(validator.iter_errors(arguments), key=lambda e: list(map(str, e.path)))
    except (RecursionError, Unresolvable):
        # A reference the validator cannot follow: the child checks the call.
        return []
    errors = []
    for error in found:
        path = "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in error.path)
        errors.append({"path": path or "/", "message": error.message})
        if len(errors) == MAX_ERRORS:
            break
    return errors


def answer(tool: dict[str, Any], result: Any) -> Any:
    """A tool's successful result as the REST answer's body.

    With an output schema: its C{structuredContent}. Otherwise one text item
    is the JSON it holds (a tool that returns JSON as text is answered with
    that JSON), or, when it holds none, the text itself as a JSON string: what
    Open WebUI hands its model and any client reads without knowing MCP. Any
    other content (several items, images) is the content list as it is.
    """
    result = result if isinstance(result, dict) else {}
    if isinstance(tool.get("outputSchema"), dict) and "structuredContent" in result:
        return result["structuredContent"]
    content = result.get("content")
    if not isinstance(content, list):
        return None
    if len(content) == 1 and isinstance(content[0], dict) and content[0].get("type") == "text":
        text = content[0].get("text")
        if isinstance(text, str):
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                return text
    return content


def error_text(result: Any) -> str:
    """The text of a tool's error result (isError)."""
    content = result.get("content") if isinstance(result, dict) else None
    texts = [
        item["text"]
        for item in (content if isinstance(content, list) else [])
        if isinstance(item, dict)
        and item.get("type") == "text"
        and isinstance(item.get("text"), str)
    ]
    return "\n".join(texts) or "The tool reported an error"


def status_of(code: object) -> int:
    """A JSON-RPC error's HTTP status in a REST answer."""
    return STATUS_OF_CODE.get(code, 502) if isinstance(code, int) else 502


__all__ = [
    "MAX_ERRORS",
    "answer",
    "argument_errors",
    "document",
    "error_text",
    "served",
    "served_tools",
    "status_of",
]
