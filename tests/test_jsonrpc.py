"""The JSON-RPC message model."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.mcp import jsonrpc
from mcptwist.mcp.jsonrpc import Kind, ProtocolError
from mcptwist.mcp.protocol import LATEST_LEGACY, LEGACY_VERSIONS, negotiate

ids = st.one_of(st.text(max_size=10), st.integers(min_value=-(2**53), max_value=2**53))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


class ClassifyTests(SynchronousTestCase):
    @given(
        ids,
        st.text(min_size=1, max_size=20),
        st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    )
    def test_round_trip_request(self, id: Any, method: str, params: dict[str, Any]) -> None:
        message = jsonrpc.request(id, method, params)
        parsed = jsonrpc.loads(jsonrpc.dumps(message))
        self.assertEqual(parsed, message)
        self.assertEqual(jsonrpc.classify(parsed), Kind.REQUEST)
        self.assertNotIn(b"\n", jsonrpc.dumps(message))

    @given(json_values)
    def test_anything_is_classified_or_refused_with_32600(self, value: Any) -> None:
        try:
            jsonrpc.classify(value)
        except ProtocolError as e:
            self.assertEqual(e.code, jsonrpc.INVALID_REQUEST)

    def test_kinds(self) -> None:
        self.assertEqual(jsonrpc.classify(jsonrpc.notification("n")), Kind.NOTIFICATION)
        self.assertEqual(jsonrpc.classify(jsonrpc.result(1, {})), Kind.RESPONSE)
        self.assertEqual(jsonrpc.classify(jsonrpc.error(1, -1, "x")), Kind.RESPONSE)

    def test_invalid_shapes(self) -> None:
        for bad in (
            [],
            {"jsonrpc": "1.0", "method": "x"},
            {"jsonrpc": "2.0", "id": None, "method": "x"},
            {"jsonrpc": "2.0", "id": True, "method": "x"},
            {"jsonrpc": "2.0", "id": 1},
            {"jsonrpc": "2.0", "id": 1, "result": 1, "error": {}},
            {"jsonrpc": "2.0", "method": ""},
            {"jsonrpc": "2.0", "method": "x", "params": 3},
        ):
            self.assertRaises(ProtocolError, jsonrpc.classify, bad)

    @given(st.binary(max_size=50))
    def test_bad_json_is_32700(self, data: bytes) -> None:
        try:
            jsonrpc.loads(data)
        except ProtocolError as e:
            self.assertEqual(e.code, jsonrpc.PARSE_ERROR)


class NegotiateTests(SynchronousTestCase):
    @given(
        st.sampled_from([*LEGACY_VERSIONS, "1999-01-01", "2026-07-28", None]),
        st.sampled_from([*LEGACY_VERSIONS, None]),
    )
    def test_never_above_what_the_child_speaks(self, requested: Any, child: Any) -> None:
        version = negotiate(requested, child) if child else negotiate(requested)
        top = child or LATEST_LEGACY
        self.assertIn(version, LEGACY_VERSIONS)
        self.assertLessEqual(version, top)
        if requested in LEGACY_VERSIONS and requested <= top:
            self.assertEqual(version, requested)
        else:
            self.assertEqual(version, top)
