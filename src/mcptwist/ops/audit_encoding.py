# -*- test-case-name: tests.test_audit -*-
"""An audit record as one line of JSON (whatever it holds), and the time its
C{ts} field gives."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final

import orjson

_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def timestamp(seconds: float) -> str:
    """UTC ISO 8601 with microseconds and a C{Z}: C{2026-11-21T23:59:59.123456Z}."""
    try:
        moment = datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        moment = datetime.fromtimestamp(time.time(), UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_record(record: Mapping[str, object]) -> bytes:
    """One JSON line for C{record}; never raises.

    orjson first; the standard library for what orjson refuses (huge
    integers; lone surrogates, written as U+FFFD); and if even that fails, the record without
    its C{arguments}, marked C{"arguments_unencodable": true}.
    """
    try:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)
    except TypeError:
        pass
    try:
        text = json.dumps(
            record, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str
        )
        # A lone surrogate becomes U+FFFD, so that every JSON parser reads the line.
        return _SURROGATE.sub("\ufffd", text).encode() + b"\n"
    except Exception:
        pass
    bare: dict[str, object] = {k: v for k, v in record.items() if k != "arguments"}
    bare["arguments_unencodable"] = True
    try:
        text = json.dumps(bare, separators=(",", ":"), allow_nan=False, default=str)
    except Exception:
        text = json.dumps(
            {"ts": str(record.get("ts")), "event": str(record.get("event")), "unencodable": True}
        )
    return text.encode() + b"\n"
