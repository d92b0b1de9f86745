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
from pipeline.api import JSON, SOURCE_HEADER, Codec, Dedup, Emit, Invalid, Pipeline
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
