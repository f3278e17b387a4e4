"""The SSE parser: framing rules, chunk boundaries anywhere, and every captured Dify stream."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from difyq.worker.dify.sse import SSEEvent, SSEParser
from tests.support.captures import iter_captures

STREAMS = {capture.name: capture.body for capture in iter_captures() if capture.is_event_stream}

# Not from Dify: CRLF and bare CR line ends, multi-line data, comments, named events and multibyte text.
SYNTHETIC = (
    ": comment\r\n"
    "event: ping\r\n\r\n"
    'data: {"answer": "你好👋 héllo"}\r\n\r\n'
    "event: update\rdata: first\rdata: second\r\r"
    "event: update\r\ndata: third\r\ndata: fourth\r\n\r\n"
    "id: 7\nretry: 100\ndata\n\n"
).encode()


def parse_whole(body: bytes) -> list[SSEEvent]:
    return SSEParser().feed(body)


def parse_in_pieces(body: bytes, cuts: list[int]) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    bounds = [0, *sorted(set(cuts)), len(body)]
    for start, end in itertools.pairwise(bounds):
        events += parser.feed(body[start:end])
    return events


def test_data_events_and_defaults() -> None:
    assert parse_whole(SYNTHETIC) == [
        SSEEvent("message", '{"answer": "你好👋 héllo"}'),
        SSEEvent("update", "first\nsecond"),
        SSEEvent("update", "third\nfourth"),
        SSEEvent("message", ""),
    ]


def test_ping_without_data_is_not_an_event() -> None:
    assert parse_whole(b"event: ping\n\nevent: ping\r\n\r\n") == []


def test_event_not_closed_by_a_blank_line_is_dropped() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"event": "message_end"}\n') == []
    assert parser.feed(b"") == []


def test_one_byte_at_a_time_including_inside_multibyte_characters() -> None:
    body = 'data: {"answer": "日本語 ✓ 🎉"}\r\n\r\n'.encode()
    parser = SSEParser()
    events = [event for index in range(len(body)) for event in parser.feed(body[index : index + 1])]
    assert events == [SSEEvent("message", '{"answer": "日本語 ✓ 🎉"}')]


def test_cr_at_the_end_of_a_chunk_then_lf() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n\r") == [SSEEvent("message", "a")]
    assert parser.feed(b"\ndata: b\r\r") == [SSEEvent("message", "b")]
    assert parser.feed(b"event: named\r") == []
    assert parser.feed(b"\ndata: c\r") == []
    assert parser.feed(b"\ndata: d\r\n\r\n") == [SSEEvent("named", "c\nd")]


def test_space_after_colon_is_stripped_once() -> None:
    assert parse_whole(b"data:no space\n\ndata:  two spaces\n\n") == [
        SSEEvent("message", "no space"),
        SSEEvent("message", " two spaces"),
    ]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert parse_whole(b"data: \xff\xfe\n\n") == [SSEEvent("message", "\ufffd\ufffd")]


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_every_captured_stream_parses_to_its_data_lines(name: str) -> None:
    body = STREAMS[name]
    data_lines = [line[len(b"data: ") :].decode() for line in body.split(b"\n") if line.startswith(b"data: ")]
    events = parse_whole(body)
    assert [event.data for event in events] == data_lines
    assert all(event.event == "message" for event in events)
    assert all("event" in json.loads(event.data) for event in events)


def test_the_captured_ping_is_ignored() -> None:
    body = STREAMS["chat_streaming_with_ping.txt"]
    assert body.startswith(b"event: ping\n\n")
    events = parse_whole(body)
    assert [json.loads(event.data)["event"] for event in events] == ["message"] * 6 + ["message_end"]


# LF-only lines (the parser's fast path) and then every other kind of line end.
MIXED = b'data: {"answer": "lf only"}\n\nevent: named\ndata: x\n\n' + SYNTHETIC
SPLIT_CASES = {"synthetic": SYNTHETIC, "mixed": MIXED, **STREAMS}


def test_lf_only_lines_then_other_line_ends() -> None:
    assert parse_whole(MIXED) == [SSEEvent("message", '{"answer": "lf only"}'), SSEEvent("named", "x"),
                                  *parse_whole(SYNTHETIC)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(sorted(SPLIT_CASES)))
def test_any_split_gives_the_same_events(data: st.DataObject, name: str) -> None:
    body = SPLIT_CASES[name]
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=len(body) - 1), max_size=40), label="cuts")
    assert parse_in_pieces(body, cuts) == parse_whole(body)


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=30), line_end=st.sampled_from(["\n", "\r\n", "\r"]), data=st.data())
def test_any_text_survives_any_split_and_line_end(text: str, line_end: str, data: st.DataObject) -> None:
    payload = json.dumps({"answer": text}, ensure_ascii=False)
    body = f"data: {payload}{line_end}{line_end}".encode()
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=len(body) - 1), max_size=20), label="cuts")
    assert parse_in_pieces(body, cuts) == [SSEEvent("message", payload)]
