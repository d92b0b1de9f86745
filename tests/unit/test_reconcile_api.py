"""``reconcile`` for declared pipelines (:mod:`pipeline.tools.reconcile_api`): its own
replay of a stage, and that its comparison fails on a loss, a duplicate and a stray."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipeline.api import JSON, Dedup, Emit, Invalid, Pipeline, StageInfo
from pipeline.kafka_io import Msg
from pipeline.settings import Settings
from pipeline.tools.reconcile import TopicCheck
from pipeline.tools.reconcile_api import _diff, _Stage, _Window


def parse(value: bytes) -> dict[str, Any] | Invalid:
    try:
        return dict(json.loads(value))
    except ValueError:
        return Invalid("not JSON")


def _info(tmp_path: Path, **stage: Any) -> tuple[StageInfo, list[Any]]:
    pipe = Pipeline("t-rec", settings=Settings(app_id="t-rec", datadir=tmp_path))
    calls: list[Any] = []

    def op(*args: Any) -> Any:
        calls.append(args)
        doc = args[-1]
        if doc.get("boom"):
            raise RuntimeError("a bug")
        if "state" in stage:
            total = (args[0] or 0) + doc["n"]
            return total, [Emit("out", doc["k"].encode(), str(total).encode())]
        return [Emit("out", None, doc["id"].encode())]

    pipe.stage("s", source="in", parse=parse, outputs=["out"], **stage)(op)
    return pipe.stages["s"], calls


def _msgs(docs: list[tuple[dict[str, Any], int]]) -> dict[int, list[Msg]]:
    return {0: [Msg(0, i, ms, None, json.dumps(d).encode()) for i, (d, ms) in enumerate(docs)]}


def test_the_window_forgets_an_accepted_copy_only_after_window_and_grace() -> None:
    w = _Window(window_ms=10, grace_ms=5)
    assert w.copies(b"a", 100) == (False, 100, [])
    w.accepted[b"a"], w.newest = [100], 100
    assert w.copies(b"a", 109)[0]  # within the window
    assert not w.copies(b"a", 110)[0]  # just past it
    # An arrival 15 ms later forgets the accepted copy: it is then no longer repeated.
    assert w.copies(b"a", 115) == (False, 115, [])


def test_a_replayed_stage_drops_copies_and_dead_letters_a_failing_record(tmp_path: Path) -> None:
    info, calls = _info(
        tmp_path, dedup=Dedup(key=lambda d: d["id"].encode(), window=timedelta(seconds=1))
    )
    stage = _Stage(info, None)
    stage.replay(
        _msgs(
            [
                ({"id": "a"}, 0),
                ({"id": "a"}, 500),  # a copy
                ({"id": "b", "boom": True}, 600),  # raises: dead-lettered, not accepted
                ({"id": "b"}, 700),  # so this one is the first "b"
                ({"id": "a"}, 1_000),  # a second after the first "a": new
            ]
        )
    )
    assert stage.expected == Counter({("out", None, b"a"): 2, ("out", None, b"b"): 1})
    assert stage.dead_letters == Counter({("in", 0, 2): 1})
    assert len(calls) == 4  # the copy never reached the operator


def test_a_replayed_stateful_stage_keeps_encoded_state_per_key(tmp_path: Path) -> None:
    info, _ = _info(tmp_path, key=lambda d: d["k"].encode(), state=JSON)
    stage = _Stage(info, None)
    stage.replay(_msgs([({"k": "x", "n": 2}, 0), ({"k": "y", "n": 1}, 0), ({"k": "x", "n": 3}, 0)]))
    assert stage.state == {b"x": b"5", b"y": b"1"}
    assert stage.expected[("out", b"x", b"5")] == 1


def test_a_reference_replaces_the_operator(tmp_path: Path) -> None:
    info, calls = _info(tmp_path)

    def reference(stage: StageInfo, events: list[Any]) -> list[Emit]:
        return [Emit("out", None, e["id"].encode()) for e in events]

    stage = _Stage(info, reference)
    stage.replay(_msgs([({"id": "a"}, 0), ({"id": "b"}, 0)]))
    assert calls == []
    assert stage.expected == Counter({("out", None, b"a"): 1, ("out", None, b"b"): 1})


def test_the_comparison_names_a_loss_a_duplicate_and_a_stray() -> None:
    check = TopicCheck("out")
    want = Counter({"a": 1, "b": 2, "c": 1})
    got = Counter({"a": 2, "b": 1, "d": 1})
    _diff(check, want, got, str)
    assert (check.duplicates, check.missing, check.unexpected) == (1, 2, 1)
    assert not check.ok
    clean = TopicCheck("out")
    _diff(clean, want, Counter(want), str)
    assert clean.ok and clean.expected == clean.actual == 4


def test_it_takes_no_decision_from_the_engine() -> None:
    # The declared parse, operators and codecs are the user's; the dedup reading and the
    # comparison are its own. (It loads pipeline.api for the declaration's types, and
    # that loads the engine, but it calls none of it.)
    import ast

    import pipeline.tools.reconcile_api as module

    allowed = {
        "pipeline.api": {"SOURCE_HEADER", "Emit", "Invalid", "Pipeline", "StageInfo"},
        "pipeline.connection": {"KafkaConnection"},
        "pipeline.kafka_io": {"Msg", "read_topic"},
        "pipeline.tools.reconcile": {"Report", "TopicCheck", "_peak_rss_mb", "open_transactions"},
    }
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
            names = {a.name for a in node.names}
            assert names <= allowed.get(node.module or "", set()), (node.module, names)
