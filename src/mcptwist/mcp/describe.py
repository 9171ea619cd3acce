# -*- test-case-name: tests.test_audit -*-
"""How a request is described in records: what it names, and a digest of its
arguments that identifies them without keeping them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Final

import orjson

_NAME_KEYS: Final = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    "resources/subscribe": "uri",
    "resources/unsubscribe": "uri",
}


def argument_digest(params: object) -> tuple[int, str]:
    """The byte size and SHA-256 (hex) of a request's arguments.

    The canonical form is JSON with sorted keys. A mapping with an
    C{arguments} key (C{tools/call}, C{prompts/get}) is digested by that
    value, anything else whole; absent params (None) are empty. Never
    raises, whatever the client sent.
    """
    if params is None:
        data = b""
    else:
        try:
            value = (
                params["arguments"]
                if isinstance(params, Mapping) and "arguments" in params
                else params
            )
        except Exception:
            value = params
        data = _canonical(value)
    return len(data), hashlib.sha256(data).hexdigest()


def request_name(method: object, params: object) -> str | None:
    """The tool, prompt or resource a request names, or None.

    C{tools/call} and C{prompts/get} give C{params["name"]}, the
    C{resources/read}, C{subscribe} and C{unsubscribe} methods C{params["uri"]}.
    Never raises: a missing or non-string value is None.
    """
    key = _NAME_KEYS.get(method) if isinstance(method, str) else None
    if key is None or not isinstance(params, Mapping):
        return None
    try:
        value = params.get(key)
    except Exception:
        return None
    return value if isinstance(value, str) else None


def _canonical(value: object) -> bytes:
    """Sorted-key JSON of C{value}, falling back rather than raising."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except TypeError:
        pass
    try:
        # Integers beyond 64 bits and lone surrogates, which orjson refuses.
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr).encode()
    except Exception:
        return repr(value).encode("utf-8", "backslashreplace")


# What a tool's definition is made of, for pinning: what the model reads and
# what decides how the tool is called.
TOOL_FIELDS: Final = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")


def tool_digest(tool: Mapping[str, object]) -> str:
    """The SHA-256 (hex) of a tool's definition: its name, title, description,
    input and output schemas and annotations (absent fields count as absent,
    so a field that appears changes the digest)."""
    return hashlib.sha256(_canonical({k: tool[k] for k in TOOL_FIELDS if k in tool})).hexdigest()
