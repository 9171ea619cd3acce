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


class ErrorCodeTests(SynchronousTestCase):
    def test_the_numbers_clients_see(self) -> None:
        """Each meaning has a name of its own; the number on the wire is fixed,
        and several meanings share one."""
        names = [n for n in vars(jsonrpc) if n.isupper() and isinstance(getattr(jsonrpc, n), int)]
        self.assertEqual(
            {n: getattr(jsonrpc, n) for n in names},
            {
                "PARSE_ERROR": -32700,
                "INVALID_REQUEST": -32600,
                "METHOD_NOT_FOUND": -32601,
                "INVALID_PARAMS": -32602,
                "INTERNAL_ERROR": -32603,
                "UNANSWERABLE": -32603,
                "SERVER_UNAVAILABLE": -32000,
                "BAD_SESSION": -32000,
                "SESSION_TERMINATED": -32000,
                "FORBIDDEN": -32000,
                "MISDIRECTED": -32000,
                "RATE_LIMITED": -32000,
                "AUTH_UNAVAILABLE": -32000,
                "REQUEST_TIMEOUT": -32001,
                "UNAUTHORIZED": -32001,
                "SESSION_NOT_FOUND": -32001,
                "MESSAGE_TOO_LARGE": -32002,
                "RESOURCE_NOT_FOUND": -32002,
                "HEADER_MISMATCH": -32020,
                "MISSING_CAPABILITY": -32021,
                "UNSUPPORTED_VERSION": -32022,
                "URL_ELICITATION_REQUIRED": -32042,
                "REQUEST_CANCELLED": -32800,
            },
        )


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
