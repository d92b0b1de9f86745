"""The benchmark's accounting, without Kafka and without timing anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from pipeline.tools.bench import _broker_pid, _BrokerCpu
from pipeline.tools.bench_raw import Counts, handle
from pipeline.tools.bench_stats import (
    Run,
    percentile,
    ratios,
    render_ratios,
    render_table,
    spread,
    summarize,
)
from pipeline.tools.generate import generate


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([3, 1, 2], 50) == 2  # unsorted input
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1], 0)


def test_spread_median_min_max_skips_missing() -> None:
    s = spread([3.0, None, 1.0, 2.0])
    assert s is not None
    assert (s.median, s.low, s.high) == (2.0, 1.0, 3.0)
    assert spread([None, None]) is None


def test_ratios_only_between_systems_that_ran() -> None:
    medians = {"eos": 90.0, "alo": 100.0, "raw": 0.0}
    out = ratios(medians, [("eos", "alo"), ("eos", "raw"), ("eos", "quix")])
    assert out == [("eos", "alo", 0.9)]


def _run(
    system: str, eps: float, p99: float | None = None, first_commit: float | None = None
) -> Run:
    return Run(
        system,
        1000,
        1000 / eps,
        eps,
        p50_ms=10,
        p99_ms=p99,
        cpu_s_per_100k=5,
        first_commit_s=first_commit,
    )


def test_table_shows_median_and_range_per_system() -> None:
    results = {
        "a": [_run("a", 100, 50, 2.5), _run("a", 300, 70, 3.0), _run("a", 200, 60, 4.25)],
        "b": [_run("b", 50)],
    }
    assert summarize(results["a"])["events_per_s"] is not None
    table = render_table(results).splitlines()
    assert table[0].startswith("| system | runs | events/s")
    assert table[0].endswith("| start to first commit s |")
    assert table[2] == (
        "| a | 3 | 200 (100-300) | 10 | 60 (50-70) | 5.0 | n/a | n/a | 3.0 (2.5-4.2) |"
    )
    assert table[3] == "| b | 1 | 50 | 10 | n/a | 5.0 | n/a | n/a | n/a |"


def test_raw_loop_counts_in_equal_counts_out() -> None:
    """A tiny run of the raw loop's decision: every input record is forwarded, dropped
    or dead-lettered, and exactly the distinct valid event ids are forwarded."""
    records = list(generate(2000, seed=3, dup_rate=0.3, bad_rate=0.02))
    batch = [
        ("in", 0, offset, 1_700_000_000_000 + offset, r.key, r.value)
        for offset, r in enumerate(records)
    ]
    counts = Counts()
    seen: dict[bytes, bytes] = {}
    # Two batches, as the loop's getmany would hand them over.
    out = handle(batch[:700], seen, counts) + handle(batch[700:], seen, counts)
    assert counts.seen == len(records)
    assert counts.unique + counts.dropped + counts.dlq == counts.seen
    assert len(out) == counts.unique + counts.dlq
    bad = sum(r.kind.startswith("bad:") for r in records)
    assert counts.dlq == bad
    forwarded = [orjson.loads(v)["event_id"] for kind, _, v in out if kind == "unique"]
    assert len(forwarded) == len(set(forwarded))
    valid_ids = {orjson.loads(r.value)["event_id"] for r in records if r.kind in ("new", "dup")}
    assert set(forwarded) == valid_ids


def test_outbox_table_reports_median_min_max() -> None:
    from pipeline.tools.bench import render_outbox

    runs = [
        {"rows": 1000, "relay_rows_per_s": 900.0, "sink_records_per_s": 2000.0},
        {"rows": 1000, "relay_rows_per_s": 1100.0, "sink_records_per_s": 1000.0},
        {"rows": 1000, "relay_rows_per_s": 1000.0, "sink_records_per_s": 3000.0},
    ]
    text = render_outbox(runs, "postgresql+psycopg://u@127.0.0.1:55432/db")
    assert "on postgresql (1000 rows per run)" in text
    assert "| outbox relay | 1000 | 900 | 1100 |" in text
    assert "| sink | 2000 | 1000 | 3000 |" in text


def test_profile_breakdown_attributes_each_sample_once() -> None:
    from pipeline.tools.bench_profile import breakdown

    raw = "\n".join(
        [
            "main;Coordinator._process (c.py:1);Coordinator._apply;decide_record (a.py:1) 30",
            "main;Coordinator._process (c.py:1);Coordinator._emit (c.py:9);produce (m.py:1) 20",
            "Thread._bootstrap (threading.py:1);EpollSelector.select (selectors.py:468) 40",
            "main;BaseEventLoop._run_once;EpollSelector.select (selectors.py:468) 5",
            "main;something_else (x.py:1) 5",
            "not a sample line",
        ]
    )
    shares = dict(breakdown(raw))
    assert shares == {
        "consumer thread": 0.4,
        "stage: pure decision": 0.3,
        "sends into the transaction": 0.2,
        "idle (event loop waiting)": 0.05,
        "other": 0.05,
    }
    assert breakdown("") == []


def test_the_quix_peer_imports_without_faust() -> None:
    """bench_quix runs in an environment of its own, without Faust: the pure decision it
    shares with our agent must import without it (a bench run once lost its Quix figures
    to an agent module importing Faust at import time)."""
    import subprocess
    import sys

    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('faust', 'mode', 'aiokafka'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pipeline.tools.bench_quix\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_only_selects_systems_by_key() -> None:
    from pipeline.tools.bench import DEDUP, QUIX, selected

    assert selected(None) is None
    assert selected("dedup-eos, quix") == {DEDUP.format("exactly_once"), QUIX}
    with pytest.raises(SystemExit, match="unknown"):
        selected("dedup-eos,nope")


def test_broker_cpu_is_read_only_from_a_process_that_is_the_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pid file of ``scripts/kafka`` can outlive its broker, and the pid be reused:
    a process whose command line does not name Kafka is not measured."""
    monkeypatch.delenv("PIPELINE_BENCH_BROKER_PID", raising=False)
    monkeypatch.setenv("KAFKA_HOME", str(tmp_path))
    assert _broker_pid() is None  # no pid file
    sleep = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    other = subprocess.Popen([*sleep, "not-the-broker"], stdout=subprocess.PIPE)
    broker = subprocess.Popen([*sleep, "kafka.Kafka", "server.properties"], stdout=subprocess.PIPE)
    try:
        # Until a child has printed, its command line may still be its parent's.
        for p in (other, broker):
            assert p.stdout is not None and p.stdout.readline() == b"up\n"
        (tmp_path / "broker.pid").write_text(f"{other.pid}\n")
        assert _broker_pid() is None
        assert _BrokerCpu().per_100k(1000) is None
        (tmp_path / "broker.pid").write_text(f"{broker.pid}\n")
        assert _broker_pid() == broker.pid
        measured = _BrokerCpu().per_100k(1000)
        assert measured is not None and measured >= 0
        monkeypatch.setenv("PIPELINE_BENCH_BROKER_PID", str(other.pid))
        assert _broker_pid() is None
    finally:
        for p in (other, broker):
            p.kill()
            p.wait()


def test_several_partition_counts_are_labelled_and_compared_in_one_invocation() -> None:
    from pipeline.tools.bench import DEDUP, QUIX, label, ratio_pairs

    eos = DEDUP.format("exactly_once")
    assert label(eos, 8, [8]) == eos  # one count: the names stay as they were
    assert label(eos, 64, [8, 64]) == f"{eos}, 64 partitions"
    pairs = ratio_pairs([8, 64])
    assert (f"{eos}, 8 partitions", f"{QUIX}, 8 partitions") in pairs
    assert (f"{eos}, 64 partitions", f"{QUIX}, 64 partitions") in pairs
    # Each system at 64 against itself at 8, in the same run.
    assert (f"{eos}, 64 partitions", f"{eos}, 8 partitions") in pairs
    assert all(a != b for a, b in pairs)
    results = {
        f"{eos}, 8 partitions": [_run(f"{eos}, 8 partitions", 200)],
        f"{eos}, 64 partitions": [_run(f"{eos}, 64 partitions", 170)],
    }
    assert f"- {eos}, 64 partitions / {eos}, 8 partitions: 0.85" in render_ratios(results, pairs)


def test_the_partitions_option_takes_one_count_or_several() -> None:
    import argparse

    from pipeline.__main__ import _partition_counts

    assert _partition_counts("8") == [8]
    assert _partition_counts("8,64") == [8, 64]
    for bad in ("0", "1025", "8,8", "eight", "8,"):
        with pytest.raises(argparse.ArgumentTypeError):
            _partition_counts(bad)
