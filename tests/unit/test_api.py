"""The public API (:mod:`pipeline.api`): what a declared stage does with each record,
called as the engine calls it (``handle(record, out)``), without a broker."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from faust.types import TP

from pipeline.admin import RAW_CONFIG
from pipeline.api import (
    ID_HEADER,
    JSON,
    SOURCE_HEADER,
    Codec,
    Dedup,
    Emit,
    Invalid,
    Keyed,
    Pipeline,
)
from pipeline.eos.stage import Out, Stage
from pipeline.settings import Settings


@dataclass(frozen=True)
class Rec:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


def parse(value: bytes) -> dict[str, Any] | Invalid:
    try:
        doc = json.loads(value)
    except ValueError:
        return Invalid("not JSON")
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
        return Invalid("no id")
    return doc


def _pipe(tmp_path: Path, **settings: Any) -> Pipeline:
    return Pipeline("t-api", settings=Settings(app_id="t-api", datadir=tmp_path, **settings))


def _stage(pipe: Pipeline, topic: str) -> Stage:
    return pipe.app.eos.runners[topic].stage


def _run(stage: Stage, records: list[Rec]) -> list[Any]:
    """Handle ``records`` in order; the outputs, as (topic, key, value, timestamp)."""
    sends = []
    for r in records:
        out = Out(TP(r.topic, r.partition))
        out.offset = r.offset
        stage.handle(r, out)
        sends.extend((s.topic, s.key, s.value, s.timestamp_ms, s.headers) for s in out.sends)
    return sends


def _doc(i: str, **extra: Any) -> bytes:
    return json.dumps({"id": i, **extra}).encode()


def test_a_stateless_stage_sends_what_its_operator_emits(tmp_path: Path) -> None:
    pipe = _pipe(tmp_path)

    @pipe.stage("upper", source="in", parse=parse, outputs=["out"])
    def upper(doc: dict[str, Any]) -> list[Emit]:
        return [Emit("out", doc["id"].encode(), doc["id"].upper().encode())]

    sends = _run(_stage(pipe, "in"), [Rec("in", 0, 5, 1000, None, _doc("ab"))])
    assert [(t, k, v) for t, k, v, _, _ in sends] == [("out", b"ab", b"AB")]
    assert upper({"id": "x"}) == [Emit("out", b"x", b"X")]  # still the plain function


def test_an_invalid_record_is_dead_lettered_with_its_reason_and_place(tmp_path: Path) -> None:
    pipe = _pipe(tmp_path)

    @pipe.stage("echo", source="in", parse=parse, outputs=["out"])
    def echo(doc: dict[str, Any]) -> list[Emit]:
        return [Emit("out", None, b"x")]

    sends = _run(_stage(pipe, "in"), [Rec("in", 3, 17, 1000, b"k", b"{nope")])
    assert len(sends) == 1
    topic, _, value, _, _ = sends[0]
    assert topic == "t-api.dlq"
    doc = json.loads(value)
    assert (doc["reason"], doc["topic"], doc["partition"], doc["offset"]) == (
        "not JSON",
        "in",
        3,
        17,
    )
    assert doc["raw"] == "{nope"
    assert pipe.app.stats.dlq == 1


def test_an_output_to_an_undeclared_topic_fails_the_record(tmp_path: Path) -> None:
    # The engine retries such a record, then dead-letters it: never a silent send.
    pipe = _pipe(tmp_path)

    @pipe.stage("stray", source="in", parse=parse, outputs=["out"])
    def stray(doc: dict[str, Any]) -> list[Emit]:
        return [Emit("elsewhere", None, b"x")]

    with pytest.raises(ValueError, match="not one of its outputs"):
        _run(_stage(pipe, "in"), [Rec("in", 0, 0, 1000, None, _doc("a"))])


def test_dedup_drops_copies_within_the_window_of_their_arrival(tmp_path: Path) -> None:
    pipe = _pipe(tmp_path)

    @pipe.stage(
        "once",
        source="in",
        parse=parse,
        outputs=["out"],
        dedup=Dedup(key=lambda d: d["id"].encode(), window=timedelta(seconds=10)),
    )
    def once(doc: dict[str, Any]) -> list[Emit]:
        return [Emit("out", None, doc["id"].encode())]

    arrivals = [("a", 0), ("a", 9_999), ("b", 5_000), ("a", 10_000), ("a", 19_999)]
    records = [Rec("in", 0, i, ms, None, _doc(i_d)) for i, (i_d, ms) in enumerate(arrivals)]
    sends = _run(_stage(pipe, "in"), records)
    # "a" at 10,000 is 10 s after the accepted copy: new; 19,999 is within it again.
    assert [v for _, _, v, _, _ in sends] == [b"a", b"b", b"a"]
    assert pipe.app.stats.duplicates_dropped == 2 and pipe.app.stats.unique == 3
    assert pipe.app.topic_overrides["in"] == RAW_CONFIG  # the window runs on append time
    assert "in" in pipe.app.append_time_topics


def test_a_stateful_stage_keeps_each_keys_state_through_its_codec(tmp_path: Path) -> None:
    pipe = _pipe(tmp_path)
    codec: Codec[int] = Codec(lambda n: str(n).encode(), lambda b: int(b))

    @pipe.stage(
        "count",
        source="in",
        parse=parse,
        outputs=["counts"],
        key=lambda d: d["user"].encode(),
        state=codec,
    )
    def count(n: int | None, doc: dict[str, Any]) -> tuple[int | None, list[Emit]]:
        new = (n or 0) + 1
        if doc.get("reset"):
            return None, []
        return new, [Emit("counts", doc["user"].encode(), str(new).encode())]

    docs = [("u1", {}), ("u2", {}), ("u1", {}), ("u1", {"reset": True}), ("u1", {})]
    records = [
        Rec("in", 0, i, 1000, None, _doc(str(i), user=u, **extra))
        for i, (u, extra) in enumerate(docs)
    ]
    sends = _run(_stage(pipe, "in"), records)
    assert [(k, v) for _, k, v, _, _ in sends] == [
        (b"u1", b"1"),
        (b"u2", b"1"),
        (b"u1", b"2"),
        (b"u1", b"1"),  # the reset deleted the state
    ]
    assert "in" in pipe.app.keyed_topics  # state is partitioned like its source


def test_partition_by_forwards_valid_records_through_an_internal_topic(tmp_path: Path) -> None:
    pipe = _pipe(tmp_path, topic_prefix="staging.")

    @pipe.stage(
        "totals",
        source="pay",
        parse=parse,
        outputs=["sums"],
        partition_by=lambda d: d["m"].encode(),
        key=lambda d: d["m"].encode(),
        state=JSON,
    )
    def totals(total: Any, doc: dict[str, Any]) -> tuple[Any, list[Emit]]:
        return (total or 0) + doc["n"], [
            Emit("sums", doc["m"].encode(), b"%d" % ((total or 0) + doc["n"]))
        ]

    info = pipe.stages["totals"]
    assert info.source == "staging.pay" and info.outputs == ("staging.sums",)
    assert info.processed_from == "t-api-totals-repartition"
    route = _stage(pipe, "staging.pay")
    sends = _run(
        route,
        [
            Rec("staging.pay", 2, 40, 777, b"x", _doc("p1", m="shop", n=5)),
            Rec("staging.pay", 2, 41, 778, b"x", b"garbage"),
        ],
    )
    (topic, key, value, ts, headers), letter = sends
    assert (topic, key, ts) == ("t-api-totals-repartition", b"shop", 777)  # its arrival
    assert value == _doc("p1", m="shop", n=5) and headers == [(SOURCE_HEADER, b"2:40")]
    assert letter[0] == "staging.t-api.dlq"
    # The stage proper reads the internal topic.
    stage = _stage(pipe, "t-api-totals-repartition")
    out = _run(stage, [Rec("t-api-totals-repartition", 1, 0, 777, b"shop", value)])
    assert [(t, k, v) for t, k, v, _, _ in out] == [("staging.sums", b"shop", b"5")]


def test_declarations_that_cannot_work_are_refused(tmp_path: Path) -> None:
    pipe = _pipe(tmp_path)

    def op(doc: Any) -> list[Emit]:
        return []

    pipe.stage("one", source="in", parse=parse, outputs=[])(op)
    with pytest.raises(ValueError, match="declared already"):
        pipe.stage("one", source="in2", parse=parse, outputs=[])(op)
    with pytest.raises(ValueError, match="letters, digits"):
        pipe.stage("bad name", source="in3", parse=parse, outputs=[])(op)
    with pytest.raises(ValueError, match="both key= and state="):
        pipe.stage("half", source="in4", parse=parse, outputs=[], key=lambda d: b"")  # type: ignore[call-overload]
    assert not pipe.app.order_topics  # the order pipeline's topics are not checked


def test_keyed_parse_judges_a_record_with_its_key(tmp_path: Path) -> None:
    pipe = _pipe(tmp_path)

    def parse_keyed(value: bytes, key: bytes | None) -> dict[str, Any] | Invalid:
        doc = parse(value)
        if not isinstance(doc, Invalid) and key is not None and key != doc["id"].encode():
            return Invalid("the key is not the id")
        return doc

    @pipe.stage("echo", source="in", parse=Keyed(parse_keyed), outputs=["out"])
    def echo(doc: dict[str, Any]) -> list[Emit]:
        return [Emit("out", None, doc["id"].encode())]

    sends = _run(
        _stage(pipe, "in"),
        [
            Rec("in", 0, 0, 1000, b"a", _doc("a")),
            Rec("in", 0, 1, 1000, None, _doc("b")),
            Rec("in", 0, 2, 1000, b"x", _doc("c")),
        ],
    )
    assert [(t, v) for t, _, v, _, _ in sends[:2]] == [("out", b"a"), ("out", b"b")]
    assert sends[2][0] == "t-api.dlq" and b"the key is not the id" in sends[2][2]
    assert pipe.stages["echo"].parse(_doc("a"), b"z") == Invalid("the key is not the id")


def test_a_dedup_stage_forwards_each_event_once_through_its_hop(tmp_path: Path) -> None:
    pipe = _pipe(tmp_path)
    info = pipe.dedup(
        "once",
        source="raw",
        parse=parse,
        dedup=Dedup(key=lambda d: d["id"].encode(), window=timedelta(seconds=10)),
        to="unique",
        partition_by=lambda d: d["m"].encode(),
        table="seen",
        through="t-api-by-m",
    )
    assert (info.processed_from, info.dedup_table, info.operator) == ("t-api-by-m", "seen", None)
    assert "seen" in pipe.tables and pipe.app.topic_overrides["raw"] == RAW_CONFIG
    assert "raw" not in pipe.app.keyed_topics and "t-api-by-m" in pipe.app.keyed_topics
    hop = _run(
        _stage(pipe, "raw"),
        [
            Rec("raw", 3, 7, 500, None, _doc("e1", m="shop")),
            Rec("raw", 4, 9, 600, b"k", _doc("e1", m="shop")),  # a copy, elsewhere
            Rec("raw", 4, 10, 700, None, b"{"),
        ],
    )
    assert [(t, k, ts) for t, k, _, ts, _ in hop[:2]] == [
        ("t-api-by-m", b"shop", 500),
        ("t-api-by-m", b"shop", 600),
    ]
    assert hop[0][4] == [(SOURCE_HEADER, b"3:7"), (ID_HEADER, b"e1")]
    assert hop[2][0] == "t-api.dlq"
    assert pipe.app.stats.seen == 3 and pipe.app.stats.dlq == 1
    stage = _stage(pipe, "t-api-by-m")
    hopped = [
        Rec("t-api-by-m", 1, i, ts, k, v, tuple(h)) for i, (_, k, v, ts, h) in enumerate(hop[:2])
    ]
    # A record on the internal topic that the hop did not write: dead-lettered, not forwarded.
    foreign = Rec("t-api-by-m", 1, 2, 900, b"shop", _doc("e2", m="shop"))
    sends = _run(stage, [*hopped, foreign])
    assert [(t, k, v, ts, h) for t, k, v, ts, h in sends[:1]] == [
        ("unique", b"shop", _doc("e1", m="shop"), 500, [(SOURCE_HEADER, b"3:7")])
    ]
    assert sends[1][0] == "t-api.dlq" and ID_HEADER.encode() in sends[1][2]
    assert len(sends) == 2
    stats = pipe.app.stats
    assert (stats.seen, stats.unique, stats.duplicates_dropped) == (3, 1, 1)
    assert stats.outputs == {"unique": 1}
    assert pipe.app.topic_overrides["unique"] != {}  # carries input values whole


def test_a_dedup_stage_without_a_hop_names_each_records_own_place(tmp_path: Path) -> None:
    pipe = _pipe(tmp_path)
    pipe.dedup(
        "once",
        source="raw",
        parse=parse,
        dedup=Dedup(key=lambda d: d["id"].encode(), window=timedelta(seconds=10)),
        to="unique",
    )
    # Ids whose first byte is below 2 are escaped: none meets the table's stream row.
    ids = ["\x00stream_ms", "\x01\x00stream_ms", "a", "\x00stream_ms", "a"]
    records = [Rec("raw", 2, i, 1000 + i, b"k%d" % i, _doc(x)) for i, x in enumerate(ids)]
    sends = _run(_stage(pipe, "raw"), records)
    assert [(k, h) for _, k, _, _, h in sends] == [
        (b"k0", [(SOURCE_HEADER, b"2:0")]),
        (b"k1", [(SOURCE_HEADER, b"2:1")]),
        (b"k2", [(SOURCE_HEADER, b"2:2")]),
    ]


def test_a_state_given_back_is_not_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = _pipe(tmp_path)

    @pipe.stage(
        "keep",
        source="in",
        parse=parse,
        outputs=[],
        key=lambda d: d["user"].encode(),
        state=JSON,
    )
    def keep(seen: Any, doc: dict[str, Any]) -> tuple[Any, list[Emit]]:
        if doc.get("ignore"):
            return seen, []  # nothing changes, for a known key or a new one
        return {"n": (seen or {"n": 0})["n"] + 1}, []

    store = pipe.tables["keep"].data
    writes: list[tuple[bytes, bytes | None]] = []
    real = store.stage

    def recorded(tp: TP, k: bytes, v: bytes | None) -> None:
        writes.append((k, v))
        real(tp, k, v)

    monkeypatch.setattr(store, "stage", recorded)
    docs = [("u1", False), ("u1", True), ("u2", True), ("u1", False)]
    records = [
        Rec("in", 0, i, 1000, None, _doc(str(i), user=u, ignore=ig))
        for i, (u, ig) in enumerate(docs)
    ]
    _run(_stage(pipe, "in"), records)
    # No write for the ignored events, and no tombstone for u2, which never had a state.
    assert writes == [(b"u1", b'{"n":1}'), (b"u1", b'{"n":2}')]


def test_seen_counts_input_records_once_along_a_chain(tmp_path: Path) -> None:
    pipe = _pipe(tmp_path)

    @pipe.stage("first", source="in", parse=parse, outputs=["mid"])
    def first(doc: dict[str, Any]) -> list[Emit]:
        return [Emit("mid", None, _doc(doc["id"]))]

    @pipe.stage("second", source="mid", parse=parse, outputs=["out"])
    def second(doc: dict[str, Any]) -> list[Emit]:
        return [Emit("out", None, b"x"), Emit("out", None, b"y")]

    mids = _run(_stage(pipe, "in"), [Rec("in", 0, i, 1, None, _doc(str(i))) for i in range(3)])
    _run(_stage(pipe, "mid"), [Rec("mid", 0, i, 1, k, v) for i, (_, k, v, _, _) in enumerate(mids)])
    stats = pipe.app.stats
    assert stats.seen == 3 and stats.unique == 0  # no dedup: nothing was judged unique
    assert stats.outputs == {"mid": 3, "out": 6}
    stats.counted_as["changes"] = "out"
    assert stats.as_dict()["changes"] == 6 and "outputs" not in stats.as_dict()


def test_a_table_name_needs_a_state(tmp_path: Path) -> None:
    pipe = _pipe(tmp_path)
    with pytest.raises(ValueError, match="table="):
        pipe.stage("t", source="in", parse=parse, outputs=[], table="x")  # type: ignore[call-overload]
