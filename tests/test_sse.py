"""Server-sent events: encoding, bounded connections, replayable channels."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from mcptwist.web.sse import (
    HEARTBEAT,
    EventChannel,
    EventConnection,
    EventReader,
    EventTooLarge,
    Heartbeat,
    encode_event,
    parse_event_id,
)

from .support.messages import decode


class DummyTransportRequest(DummyRequest):
    def __init__(self) -> None:
        super().__init__([b""])
        self.aborted = False
        outer = self

        class T:
            def abortConnection(self) -> None:
                outer.aborted = True

        self.transport = T()

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r"), max_size=50
)


class EncodeTests(SynchronousTestCase):
    @given(
        text,
        st.sampled_from([None, "message", "endpoint"]),
        st.one_of(st.none(), st.from_regex(r"\A[0-9]{1,4}-[0-9]{1,4}\Z")),
    )
    def test_decodes_back(self, data: str, event: str | None, id: str | None) -> None:
        frame = encode_event(
            data.encode(), event.encode() if event else None, id.encode() if id else None
        )
        [decoded] = decode(frame)
        self.assertEqual(decoded["data"], data)
        self.assertEqual(decoded.get("event"), event)
        self.assertEqual(decoded.get("id"), id)

    def test_retry_field(self) -> None:
        [event] = decode(encode_event(b"", id=b"1-0", retry=1000))
        self.assertEqual(event, {"id": "1-0", "retry": "1000", "data": ""})

    def test_event_ids(self) -> None:
        self.assertEqual(parse_event_id("3-17"), (3, 17))
        self.assertIsNone(parse_event_id("nope"))
        self.assertIsNone(parse_event_id("\u00b2-1"))
        self.assertIsNone(parse_event_id("1-" + "9" * 40))
        self.assertIsNone(parse_event_id(None))


class ConnectionTests(SynchronousTestCase):
    def test_headers_and_frames(self) -> None:
        request = DummyTransportRequest()
        connection = EventConnection(request, Clock(), 1000)
        connection.send(b"data: a\n\n")
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"), [b"text/event-stream"]
        )
        self.assertEqual(request.responseHeaders.getRawHeaders(b"x-accel-buffering"), [b"no"])
        self.assertEqual(b"".join(request.written), b"data: a\n\n")

    def test_slow_reader_dropped_when_too_far_behind(self) -> None:
        request = DummyTransportRequest()
        connection = EventConnection(request, Clock(), 100)
        connection.pauseProducing()
        connection.send(b"x" * 150)  # one frame may exceed the limit on its own
        self.assertFalse(request.aborted)
        connection.send(b"y")
        self.assertTrue(request.aborted)
        self.assertFalse(connection.open)

    def test_paused_frames_flow_on_resume_and_finish_waits(self) -> None:
        request = DummyTransportRequest()
        connection = EventConnection(request, Clock(), 1000)
        connection.pauseProducing()
        connection.send(b"1")
        connection.send(b"2")
        connection.finish()
        self.assertEqual(request.written, [])
        self.assertEqual(request.finished, 0)
        connection.resumeProducing()
        self.assertEqual(request.written, [b"1", b"2"])
        self.assertEqual(request.finished, 1)

    def test_held_frames_come_after_the_first_one_released(self) -> None:
        request = DummyTransportRequest()
        connection = EventConnection(request, Clock(), 1000)
        connection.hold()
        connection.send(b"2")
        connection.send(b"3")
        self.assertEqual(request.written, [])
        connection.release(b"1")
        connection.send(b"4")
        self.assertEqual(request.written, [b"1", b"2", b"3", b"4"])
        connection.release(b"again")  # not held: nothing
        self.assertEqual(request.written[-1], b"4")

    def test_a_finish_while_held_waits_for_the_release(self) -> None:
        request = DummyTransportRequest()
        connection = EventConnection(request, Clock(), 1000)
        connection.hold()
        connection.finish()
        self.assertEqual((request.written, request.finished), ([], 0))
        connection.release(b"1")
        self.assertEqual((request.written, request.finished), ([b"1"], 1))

    def test_a_release_while_paused_waits_for_the_reader(self) -> None:
        request = DummyTransportRequest()
        connection = EventConnection(request, Clock(), 1000)
        connection.hold()
        connection.send(b"2")
        connection.pauseProducing()
        connection.release(b"1")
        self.assertEqual(request.written, [])
        connection.resumeProducing()
        self.assertEqual(request.written, [b"1", b"2"])

    def test_a_held_reader_is_bounded_too(self) -> None:
        request = DummyTransportRequest()
        connection = EventConnection(request, Clock(), 100)
        connection.hold()
        connection.send(b"x" * 80)
        connection.send(b"y" * 80)
        self.assertTrue(request.aborted)
        connection.release(b"1")
        self.assertEqual(request.written, [])

    def test_heartbeat_only_on_quiet_connections(self) -> None:
        clock = Clock()
        quiet, busy = DummyTransportRequest(), DummyTransportRequest()
        heartbeat = Heartbeat(clock, 10)
        cq, cb = EventConnection(quiet, clock, 1000), EventConnection(busy, clock, 1000)
        heartbeat.add(cq)
        heartbeat.add(cb)
        heartbeat.start()
        for _ in range(4):
            clock.advance(5)
            cb.send(b"data: x\n\n")
        self.assertEqual(quiet.written.count(HEARTBEAT), 2)
        self.assertNotIn(HEARTBEAT, busy.written)
        heartbeat.stop()


# What an event's data may hold once decoded: any text, its line ends LF.
payloads = st.lists(
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=40).filter(
        lambda t: t.replace("\r\n", "\n").replace("\r", "\n") != ""
    ),
    max_size=6,
)


def normalized(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """C{data} cut at these offsets (each taken modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in pairwise(edges)]


class ReaderTests(SynchronousTestCase):
    @given(
        payloads,
        st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
        st.sampled_from([b"\n", b"\r\n", b"\r"]),
        st.booleans(),
    )
    def test_reads_back_what_was_encoded_however_it_is_cut(
        self, texts: list[str], cuts: list[int], newline: bytes, comments: bool
    ) -> None:
        """Every event comes back whole, in order, whatever the chunks and
        line ends, with comments and other fields skipped."""
        stream = b""
        for text in texts:
            if comments:
                stream += HEARTBEAT
            stream += encode_event(text.encode(), event=b"message", id=b"1-2", retry=10)
        stream = stream.replace(b"\n", newline)
        reader = EventReader(1 << 20)
        got: list[bytes] = []
        for chunk in split(stream, cuts):
            got += reader.feed(chunk)
        self.assertEqual([g.decode() for g in got], [normalized(t) for t in texts])

    def test_fields_as_the_format_defines_them(self) -> None:
        reader = EventReader(100)
        self.assertEqual(reader.feed(b"data:a\ndata:  b\ndata\n\n"), [b"a\n b\n"])
        self.assertEqual(reader.feed(b"data:\n\nevent: x\n\n: hi\n\n"), [])
        self.assertEqual(reader.feed(b"data: half"), [])
        self.assertEqual(reader.feed(b"\r"), [])
        self.assertEqual(reader.feed(b"\n\r\n"), [b"half"])

    def test_an_event_too_large_is_refused(self) -> None:
        reader = EventReader(10)
        self.assertEqual(reader.feed(b"data: 12345\n\n"), [b"12345"])
        reader.feed(b"data: 1234\n")
        self.assertRaises(EventTooLarge, reader.feed, b"data: 12345")
        self.assertRaises(EventTooLarge, EventReader(10).feed, b"data: " + b"x" * 20)


class ChannelTests(SynchronousTestCase):
    def test_resume_replays_what_was_missed(self) -> None:
        clock = Clock()
        channel = EventChannel(2, keep=10, max_bytes=10_000)
        first = DummyTransportRequest()
        c1 = EventConnection(first, clock, 10_000)
        channel.attach(c1)
        channel.emit(b"one")
        first.processingFailed(Failure(ConnectionDone()))  # the client disconnects
        channel.emit(b"two")
        channel.emit(b"three")
        second = DummyTransportRequest()
        channel.attach(EventConnection(second, clock, 10_000), after=1)
        events = decode(b"".join(second.written))
        self.assertEqual([(e["id"], e["data"]) for e in events], [("2-2", "two"), ("2-3", "three")])

    def test_log_is_bounded(self) -> None:
        channel = EventChannel(0, keep=3, max_bytes=10_000)
        for i in range(10):
            channel.emit(str(i).encode())
        request = DummyTransportRequest()
        channel.attach(EventConnection(request, Clock(), 10_000), after=0)
        self.assertEqual([e["data"] for e in decode(b"".join(request.written))], ["7", "8", "9"])

    def test_log_is_bounded_in_bytes_but_keeps_the_newest(self) -> None:
        channel = EventChannel(0, keep=100, max_bytes=300)
        for i in range(10):
            channel.emit(str(i).encode() * 50)
        channel.emit(b"z" * 1000)
        request = DummyTransportRequest()
        channel.attach(EventConnection(request, Clock(), 10_000), after=0)
        self.assertEqual([e["data"] for e in decode(b"".join(request.written))], ["z" * 1000])

    def test_small_backlog_until_first_attached(self) -> None:
        channel = EventChannel(0, keep=100, max_bytes=100_000, until_attached=(3, 100_000))
        for i in range(10):
            channel.emit(str(i).encode())
        request = DummyTransportRequest()
        channel.attach(EventConnection(request, Clock(), 100_000))
        self.assertEqual([e["data"] for e in decode(b"".join(request.written))], ["7", "8", "9"])
        request.processingFailed(Failure(ConnectionDone()))
        for i in range(10, 20):
            channel.emit(str(i).encode())
        again = DummyTransportRequest()
        channel.attach(EventConnection(again, Clock(), 100_000), after=10)
        self.assertEqual(len(decode(b"".join(again.written))), 10, "the full log once attached")

    def test_undelivered_events_go_to_the_first_connection(self) -> None:
        channel = EventChannel(0, keep=10, max_bytes=10_000)
        channel.emit(b"early")
        request = DummyTransportRequest()
        channel.attach(EventConnection(request, Clock(), 10_000))
        self.assertEqual([e["data"] for e in decode(b"".join(request.written))], ["early"])
