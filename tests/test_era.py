"""The stateless revision's request rules: telling eras apart, checking, shaping."""

from __future__ import annotations

import base64
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.mcp import era, jsonrpc, protocol
from mcptwist.mcp.era import MODERN, Refusal
from mcptwist.mcp.jsonrpc import Message

CAPS = era.META_CAPABILITIES
VERSION = era.META_VERSION
SERVER = {"name": "fake", "version": "1.0"}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


def b64(text: str) -> str:
    return "=?base64?" + base64.b64encode(text.encode()).decode() + "?="


def request(method: str = "tools/call", **params: Any) -> Message:
    meta = params.pop("_meta", {VERSION: MODERN, CAPS: {}})
    if method in era.NAMED_PARAM and era.NAMED_PARAM[method] not in params:
        params[era.NAMED_PARAM[method]] = "echo"
    return jsonrpc.request(7, method, {**params, "_meta": meta})


def headers_of(message: Message, **override: str | list[str] | None) -> dict[str, list[str]]:
    """The headers a well-behaved client sends with a message, with some replaced."""
    found: dict[str, list[str]] = {
        "mcp-protocol-version": [MODERN],
        "mcp-method": [message["method"]],
    }
    named = era.NAMED_PARAM.get(message["method"])
    if named is not None:
        found["mcp-name"] = [message["params"][named]]
    for name, value in override.items():
        key = name.replace("_", "-")
        if value is None:
            found.pop(key, None)
        else:
            found[key] = [value] if isinstance(value, str) else value
    return found


def check(message: Message, **override: str | list[str] | None) -> era.ModernRequest:
    headers = headers_of(message, **override)
    return era.check(message, lambda name: headers.get(name, []))


class CheckTests(SynchronousTestCase):
    def refused(self, message: Message, **override: str | list[str] | None) -> Refusal:
        with self.assertRaises(Refusal) as caught:
            check(message, **override)
        refusal: Refusal = caught.exception
        self.assertEqual(refusal.id, 7, "the request id is echoed")
        return refusal

    def assertRefused(
        self, message: Message, status: int, code: int, **override: str | list[str] | None
    ) -> Refusal:
        refusal = self.refused(message, **override)
        self.assertEqual((refusal.status, refusal.code), (status, code), refusal.message)
        return refusal

    def test_valid_request(self) -> None:
        message = request(
            "tools/call",
            arguments={"a": 1},
            _meta={
                VERSION: MODERN,
                CAPS: {"elicitation": {}},
                era.META_CLIENT: {"name": "c"},
                era.META_LOG_LEVEL: "info",
            },
        )
        checked = check(message)
        self.assertEqual((checked.id, checked.method, checked.version), (7, "tools/call", MODERN))
        self.assertEqual(checked.capabilities, {"elicitation": {}})
        self.assertEqual(checked.client_info, {"name": "c"})
        self.assertEqual(checked.log_level, "info")

    def test_client_info_and_log_level_are_optional(self) -> None:
        checked = check(request("tools/list"))
        self.assertEqual((checked.client_info, checked.log_level), ({}, None))

    def test_duplicate_header(self) -> None:
        for name in ("mcp_protocol_version", "mcp_method", "mcp_name"):
            message = request("tools/call")
            value = headers_of(message)[name.replace("_", "-")][0]
            self.assertRefused(message, 400, jsonrpc.HEADER_MISMATCH, **{name: [value, value]})

    def test_duplicate_header_comes_before_a_missing_meta(self) -> None:
        message = jsonrpc.request(7, "tools/list", {})
        self.assertRefused(message, 400, jsonrpc.HEADER_MISMATCH, mcp_method=["a", "b"])

    def test_missing_meta(self) -> None:
        no_params = jsonrpc.request(7, "tools/list")
        self.assertRefused(no_params, 400, jsonrpc.INVALID_PARAMS)
        metas: list[Any] = [None, [], {CAPS: {}}, {VERSION: "", CAPS: {}}, {VERSION: 1, CAPS: {}}]
        no_caps: list[Any] = [None, [], "x"]
        metas += [{VERSION: MODERN, CAPS: caps} for caps in no_caps]
        metas.append({VERSION: MODERN, CAPS: {}, era.META_CLIENT: "c"})
        for meta in metas:
            self.assertRefused(request("tools/list", _meta=meta), 400, jsonrpc.INVALID_PARAMS)

    def test_missing_meta_comes_before_a_header_mismatch(self) -> None:
        message = jsonrpc.request(7, "tools/list", {"_meta": {CAPS: {}}})
        self.assertRefused(message, 400, jsonrpc.INVALID_PARAMS, mcp_method="prompts/list")

    def test_version_header_must_match_meta(self) -> None:
        message = request("tools/list")
        self.assertRefused(message, 400, jsonrpc.HEADER_MISMATCH, mcp_protocol_version="2025-11-25")
        self.assertRefused(message, 400, jsonrpc.HEADER_MISMATCH, mcp_protocol_version=None)
        check(message, mcp_protocol_version=f" {MODERN}\t")
        check(message, mcp_protocol_version=b64(MODERN))

    def test_method_header_must_match(self) -> None:
        message = request("tools/list")
        self.assertRefused(message, 400, jsonrpc.HEADER_MISMATCH, mcp_method="prompts/list")
        self.assertRefused(message, 400, jsonrpc.HEADER_MISMATCH, mcp_method=None)
        check(message, mcp_method=" tools/list ")

    def test_name_header_must_match(self) -> None:
        for method, value in [("tools/call", "echo"), ("resources/read", "file:///é ü")]:
            message = request(method, **{era.NAMED_PARAM[method]: value})
            self.assertRefused(message, 400, jsonrpc.HEADER_MISMATCH, mcp_name="other")
            self.assertRefused(message, 400, jsonrpc.HEADER_MISMATCH, mcp_name=b64("other"))
            check(message, mcp_name=b64(value))
            check(message, mcp_name=f"\t{b64(value)} ")
            # Required where the body names something.
            self.assertRefused(message, 400, jsonrpc.HEADER_MISMATCH, mcp_name=None)
        # Only the named methods have a name to match.
        check(request("tools/list"), mcp_name="anything")

    def test_invalid_base64_header(self) -> None:
        message = request("tools/call")
        self.assertRefused(message, 400, jsonrpc.HEADER_MISMATCH, mcp_name="=?base64?!!!?=")
        self.assertRefused(message, 400, jsonrpc.HEADER_MISMATCH, mcp_name="=?base64?/w==?=")

    def test_unsupported_version(self) -> None:
        message = request("tools/list", _meta={VERSION: "2099-01-01", CAPS: {}})
        refusal = self.assertRefused(
            message, 400, jsonrpc.UNSUPPORTED_VERSION, mcp_protocol_version="2099-01-01"
        )
        self.assertEqual(
            refusal.data, {"supported": list(era.SUPPORTED_VERSIONS), "requested": "2099-01-01"}
        )
        self.assertIn(MODERN, refusal.data["supported"])
        self.assertIn("2025-11-25", refusal.data["supported"])

    def test_header_mismatch_comes_before_an_unsupported_version(self) -> None:
        message = request("tools/list", _meta={VERSION: "2099-01-01", CAPS: {}})
        self.assertRefused(message, 400, jsonrpc.HEADER_MISMATCH)

    def test_bad_log_level(self) -> None:
        for level in ["loud", "", 3, "DEBUG"]:
            meta = {VERSION: MODERN, CAPS: {}, era.META_LOG_LEVEL: level}
            self.assertRefused(request("tools/list", _meta=meta), 400, jsonrpc.INVALID_PARAMS)

    def test_unhashable_log_level(self) -> None:
        for level in [[], {}, ["debug"]]:
            meta = {VERSION: MODERN, CAPS: {}, era.META_LOG_LEVEL: level}
            self.assertRefused(request("tools/list", _meta=meta), 400, jsonrpc.INVALID_PARAMS)

    def test_removed_methods(self) -> None:
        for method in sorted(era.REMOVED_METHODS):
            self.assertRefused(request(method), 404, jsonrpc.METHOD_NOT_FOUND)

    def test_bad_log_level_comes_before_a_removed_method(self) -> None:
        meta = {VERSION: MODERN, CAPS: {}, era.META_LOG_LEVEL: "loud"}
        self.assertRefused(request("ping", _meta=meta), 400, jsonrpc.INVALID_PARAMS)

    @given(json_values)
    def test_arbitrary_meta_is_checked_or_refused(self, value: Any) -> None:
        """Whatever a client puts in _meta, the request is either taken with
        that value or refused with the code the revision gives (never a crash)."""
        for key in (VERSION, CAPS, era.META_CLIENT, era.META_LOG_LEVEL):
            meta = {VERSION: MODERN, CAPS: {}, key: value}
            try:
                checked = check(request("tools/list", _meta=meta))
            except Refusal as refusal:
                self.assertEqual(refusal.id, 7)
                # A version the header does not repeat is a mismatch; anything else
                # (a version that is not a string among them), bad params.
                mismatch = key == VERSION and isinstance(value, str) and value
                code = jsonrpc.HEADER_MISMATCH if mismatch else jsonrpc.INVALID_PARAMS
                self.assertEqual((refusal.status, refusal.code), (400, code), refusal.message)
                continue
            taken = {
                VERSION: checked.version,
                CAPS: checked.capabilities,
                era.META_CLIENT: checked.client_info if value is not None else None,
                era.META_LOG_LEVEL: checked.log_level,
            }[key]
            self.assertEqual(taken, value)


class IsModernTests(SynchronousTestCase):
    def test_truth_table(self) -> None:
        modern_body = request("tools/list")
        legacy_body = jsonrpc.request(1, "tools/list", {})
        cases = [
            # header, session id, body -> modern?
            (MODERN, None, legacy_body, True),
            (f" {MODERN} ", None, legacy_body, True),
            (MODERN, "sid", legacy_body, True),
            ("2025-11-25", None, modern_body, False),
            ("2025-03-26", "sid", legacy_body, False),
            ("2099-01-01", None, legacy_body, True),
            ("2099-01-01", "sid", legacy_body, False),
            (None, None, modern_body, True),
            (None, "sid", modern_body, False),
            (None, None, legacy_body, False),
            (None, None, jsonrpc.request(1, "initialize", {"protocolVersion": MODERN}), False),
            (None, None, None, False),
            (None, None, [modern_body], False),
            (None, None, jsonrpc.request(1, "x", {"_meta": "not an object"}), False),
        ]
        for header, session, body, expected in cases:
            self.assertIs(era.is_modern(header, session, body), expected, (header, session))


class DecodeHeaderTests(SynchronousTestCase):
    @given(st.text())
    def test_round_trip(self, text: str) -> None:
        self.assertEqual(era.decode_header(b64(text)), text)
        self.assertEqual(era.decode_header(f" \t{b64(text)}\t "), text)

    @given(st.text(alphabet=st.characters(blacklist_characters=" \t")))
    def test_plain_value_kept_without_surrounding_blanks(self, text: str) -> None:
        if text.startswith("=?base64?"):
            return
        self.assertEqual(era.decode_header(f"  {text}\t"), text)

    @given(st.text())
    def test_never_raises_but_a_refusal(self, value: str) -> None:
        for candidate in (value, f"=?base64?{value}?="):
            try:
                self.assertIsInstance(era.decode_header(candidate), str)
            except Refusal as refusal:
                self.assertEqual((refusal.status, refusal.code), (400, jsonrpc.HEADER_MISMATCH))


class ForChildTests(SynchronousTestCase):
    def test_client_meta_and_inputs_stripped_progress_kept(self) -> None:
        message = jsonrpc.request(
            3,
            "tools/call",
            {
                "name": "echo",
                "arguments": {"x": 1},
                "inputResponses": {"k": {}},
                "requestState": "s",
                "_meta": {
                    VERSION: MODERN,
                    CAPS: {},
                    era.META_CLIENT: {"name": "c"},
                    era.META_LOG_LEVEL: "debug",
                    "progressToken": "p1",
                    "vendor/x": 1,
                },
            },
        )
        child = era.for_child(message)
        self.assertEqual(
            child["params"],
            {
                "name": "echo",
                "arguments": {"x": 1},
                "_meta": {"progressToken": "p1", "vendor/x": 1},
            },
        )
        self.assertEqual((child["id"], child["method"]), (3, "tools/call"))
        self.assertIn("requestState", message["params"], "the original is left alone")

    def test_empty_meta_dropped(self) -> None:
        child = era.for_child(request("tools/list"))
        self.assertEqual(child["params"], {})


class ShapeTests(SynchronousTestCase):
    def test_complete_adds_result_type_and_server_info(self) -> None:
        shaped = era.complete("tools/call", {"content": [], "_meta": {"k": 1}}, SERVER)
        self.assertEqual(
            shaped,
            {
                "content": [],
                "resultType": "complete",
                "_meta": {"k": 1, era.META_SERVER: SERVER},
            },
        )

    def test_caching_hints_only_for_cached_methods(self) -> None:
        for method in sorted(era.CACHED_METHODS):
            shaped = era.complete(method, {}, SERVER)
            self.assertEqual((shaped["ttlMs"], shaped["cacheScope"]), (0, "private"), method)
        kept = era.complete("tools/list", {"ttlMs": 5000, "cacheScope": "public"}, SERVER)
        self.assertEqual((kept["ttlMs"], kept["cacheScope"]), (5000, "public"))
        for method in ("tools/call", "prompts/get", "completion/complete"):
            shaped = era.complete(method, {}, SERVER)
            self.assertNotIn("ttlMs", shaped, method)
            self.assertNotIn("cacheScope", shaped, method)

    def test_discover_from_initialize(self) -> None:
        init = {
            "protocolVersion": protocol.LATEST_LEGACY,
            "capabilities": {"tools": {"listChanged": True}, "tasks": {"list": {}}},
            "serverInfo": SERVER,
            "instructions": "be nice",
        }
        result = era.discover(init, SERVER)
        self.assertEqual(result["supportedVersions"], list(era.SUPPORTED_VERSIONS))
        self.assertEqual(result["capabilities"], {"tools": {"listChanged": True}})
        self.assertEqual(result["instructions"], "be nice")
        self.assertEqual(result["resultType"], "complete")
        self.assertEqual(result["_meta"], {era.META_SERVER: SERVER})
        self.assertNotIn("protocolVersion", result)
        bare = era.discover({"capabilities": "nonsense", "instructions": 3}, SERVER)
        self.assertEqual(bare["capabilities"], {})
        self.assertNotIn("instructions", bare)
