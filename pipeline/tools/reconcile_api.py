"""``reconcile`` for a pipeline declared with :mod:`pipeline.api`.

It rebuilds what every stage must have written from the stage's input alone, read
``read_committed``, and compares it with what the topics and the state changelogs hold:

* each record ``parse`` refuses, or whose operator raises, is dead-lettered exactly
  once, with its place in the source topic;
* with ``partition_by``, the stage's internal topic holds every valid source record
  exactly once (by the place its header names), with the same value and arrival, keyed
  by ``partition_by``; the stage is then replayed in that topic's order, which is the
  order the stage processed it in (per key, a source partition's order is kept);
* the dedup window is this module's own reading of the contract: per processing
  partition, a copy is dropped when it arrived within the window of an accepted copy of
  its key, an accepted copy being forgotten once it is ``window + grace`` older than
  the partition's newest arrival;
* the operator is replayed on the accepted events (or ``reference`` replaces it, for a
  check independent of the operator's code too), with state kept as its encoded bytes,
  as the table keeps it; every output must appear exactly as often as the replay made
  it (a missing one is a loss, an extra one a duplicate), and each key's final state
  must be the changelog's last value;
* no topic the pipeline writes holds an open transaction.

It shares no code with the engine (the parse, the operators and the codecs are the
user's declaration, not the engine's decisions).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from pipeline.api import SOURCE_HEADER, Emit, Invalid, Pipeline, StageInfo
from pipeline.connection import KafkaConnection
from pipeline.kafka_io import Msg, read_topic
from pipeline.tools.reconcile import Report, TopicCheck, _peak_rss_mb, open_transactions

#: ``reference(stage, events)``: the outputs a stage must have made from its accepted
#: events, in processing order per partition; replaces the replay of the operator.
Reference = Callable[[StageInfo, list[Any]], Iterable[Emit]]

Place = tuple[int, int]


def _source_place(headers: tuple[tuple[str, bytes], ...]) -> Place | None:
    for name, value in headers:
        if name == SOURCE_HEADER:
            partition, _, offset = value.decode().partition(":")
            return int(partition), int(offset)
    return None


class _Window:
    """One processing partition's dedup, read from the contract (not the engine's)."""

    def __init__(self, window_ms: int, grace_ms: int) -> None:
        self.window_ms = window_ms
        self.forget_ms = window_ms + grace_ms
        self.newest: int | None = None
        self.accepted: dict[bytes, list[int]] = {}

    def copies(self, key: bytes, arrival_ms: int) -> tuple[bool, int, list[int]]:
        """(whether the copy repeats an accepted one, the partition's newest arrival with
        it, the key's accepted arrivals not forgotten yet); changes nothing."""
        newest = arrival_ms if self.newest is None else max(self.newest, arrival_ms)
        kept = [a for a in self.accepted.get(key, []) if newest - a < self.forget_ms]
        return any(abs(arrival_ms - a) < self.window_ms for a in kept), newest, kept


class _Stage:
    """The rebuild of one stage."""

    def __init__(self, info: StageInfo, reference: Reference | None, prefix: str = "") -> None:
        self.info = info
        self.reference = reference
        #: PIPELINE_TOPIC_PREFIX: an Emit names a topic as declared, before it
        self.prefix = prefix
        self.expected: Counter[tuple[str, bytes | None, bytes]] = Counter()
        self.dead_letters: Counter[tuple[str, int, int]] = Counter()
        self.state: dict[bytes, bytes] = {}

    def replay(self, partitions: dict[int, list[Msg]]) -> None:
        """Each processing partition's records in order: what each made, or its dead
        letter if its handling raised (then nothing of it counts, as in the engine,
        whose retries end in the dead-letter topic)."""
        info = self.info
        dedup = info.dedup
        for partition in sorted(partitions):
            window = None
            if dedup is not None:
                window = _Window(
                    round(dedup.window.total_seconds() * 1000),
                    round(dedup.grace.total_seconds() * 1000),
                )
            accepted: list[Any] = []
            for m in partitions[partition]:
                try:
                    event = info.parse(m.value or b"", m.key)
                    if isinstance(event, Invalid):
                        continue  # judged where it was read (the source)
                    if window is not None and dedup is not None:
                        key = dedup.key(event)
                        repeat, newest, kept = window.copies(key, m.timestamp)
                        if repeat:  # dropped: only the partition's newest arrival moves
                            window.newest = newest
                            continue
                    made: tuple[list[Emit], tuple[bytes, bytes | None] | None] | None
                    if info.operator is None:
                        # A forwarding stage: the record on, unchanged, with its key.
                        made = [Emit(info.outputs[0], m.key, m.value or b"")], None
                    elif self.reference is None:
                        made = self._run(event)
                    else:
                        made = None
                except Exception:
                    self.dead_letters[(info.processed_from, m.partition, m.offset)] += 1
                    continue
                if window is not None:
                    window.newest = newest
                    window.accepted[key] = [*kept, m.timestamp]
                if made is None:
                    accepted.append(event)
                    continue
                emits, state = made
                if state is not None:
                    k, new = state
                    if new is None:
                        self.state.pop(k, None)
                    else:
                        self.state[k] = new
                for e in emits:
                    topic = e.topic if info.operator is None else self.prefix + e.topic
                    self.expected[(topic, e.key, e.value)] += 1
            if self.reference is not None:
                self.expected.update(
                    (self.prefix + e.topic, e.key, e.value) for e in self.reference(info, accepted)
                )

    def _run(self, event: Any) -> tuple[list[Emit], tuple[bytes, bytes | None] | None]:
        """The operator on ``event``: its outputs, and the key and encoded new state."""
        info = self.info
        assert info.operator is not None
        if info.state is None:
            return list(info.operator(event)), None
        assert info.key is not None
        k = info.key(event)
        raw = self.state.get(k)
        new, made = info.operator(None if raw is None else info.state.decode(raw), event)
        return list(made), (k, None if new is None else info.state.encode(new))


async def _read(kafka: KafkaConnection, topic: str) -> list[Msg]:
    return [m async for m in read_topic(kafka, topic)]


def _diff(
    check: TopicCheck,
    want: Counter[Any],
    got: Counter[Any],
    show: Callable[[Any], str],
) -> None:
    check.expected = sum(want.values())
    check.actual = sum(got.values())
    for item in sorted(set(want) | set(got), key=repr):
        w, g = want.get(item, 0), got.get(item, 0)
        if g > w and w > 0:
            check.duplicates += g - w
            check.note(f"{g - w} duplicate(s) of {show(item)}")
        elif g > w:
            check.unexpected += g
            check.note(f"unexpected {show(item)}")
        elif w > g:
            check.missing += w - g
            check.note(f"missing {w - g} of {show(item)}")


def _show_output(item: tuple[str, bytes | None, bytes]) -> str:
    topic, key, value = item
    return f"{topic} key={key!r} value={value[:120]!r}"


async def reconcile_pipeline(pipe: Pipeline, *, reference: Reference | None = None) -> Report:
    """Rebuild every stage of ``pipe`` from its input and compare (module docstring)."""
    started = time.monotonic()
    kafka = pipe.settings.kafka
    report = Report()
    expected: Counter[tuple[str, bytes | None, bytes]] = Counter()
    letters: Counter[tuple[str, int, int]] = Counter()
    outputs: set[str] = set()
    changelogs: list[str] = []
    for info in pipe.stages.values():
        source = await _read(kafka, info.source)
        report.input_records += len(source)
        rebuild = _Stage(info, reference, pipe.settings.topic_prefix)
        by_place = {(m.partition, m.offset): m for m in source}
        valid: set[Place] = set()
        hop_keys: dict[Place, bytes] = {}
        for m in source:
            place = (m.partition, m.offset)
            try:
                event = info.parse(m.value or b"", m.key)
                if not isinstance(event, Invalid) and info.partition_by is not None:
                    hop_keys[place] = info.partition_by(event)
            except Exception:
                event = Invalid("raised")
            if isinstance(event, Invalid):
                letters[(info.source, *place)] += 1
            else:
                valid.add(place)
        partitions: dict[int, list[Msg]] = {}
        if info.processed_from != info.source:
            hop = TopicCheck(info.processed_from)
            forwarded: Counter[Place] = Counter()
            for m in await _read(kafka, info.processed_from):
                named = _source_place(m.headers)
                original = by_place.get(named) if named is not None else None
                if named is None or original is None or named not in valid:
                    hop.unexpected += 1
                    hop.note(f"a record from no valid source record: {named}")
                    continue
                place = named
                forwarded[place] += 1
                if forwarded[place] > 1:
                    continue  # counted as a duplicate below; replayed once only
                if (
                    m.value != original.value
                    or m.timestamp != original.timestamp
                    or m.key != hop_keys[place]
                ):
                    hop.mismatched += 1
                    hop.note(f"the copy of {place} differs from it")
                partitions.setdefault(m.partition, []).append(m)
            _diff(hop, Counter(dict.fromkeys(valid, 1)), forwarded, lambda p: f"record {p}")
            report.checks.append(hop)
        else:
            for m in source:
                partitions.setdefault(m.partition, []).append(m)
        rebuild.replay(partitions)
        expected.update(rebuild.expected)
        letters.update(rebuild.dead_letters)
        outputs.update(info.outputs)
        if info.state_table is not None:
            changelog = f"{pipe.settings.app_id}-{info.state_table}-changelog"
            changelogs.append(changelog)
            rows: dict[bytes, bytes] = {}
            for m in await _read(kafka, changelog):
                if m.key is None:
                    continue
                if m.value is None:
                    rows.pop(m.key, None)
                else:
                    rows[m.key] = m.value
            table = TopicCheck(changelog)
            want_rows = Counter(rebuild.state.items()) if reference is None else Counter()
            if reference is None:
                _diff(table, want_rows, Counter(rows.items()), lambda kv: f"state {kv[0]!r}")
                report.checks.append(table)
        if info.dedup_table is not None:
            changelogs.append(f"{pipe.settings.app_id}-{info.dedup_table}-changelog")
        if info.processed_from != info.source:
            changelogs.append(info.processed_from)
    for topic in sorted(outputs):
        check = TopicCheck(topic)
        got = Counter((topic, m.key, m.value or b"") for m in await _read(kafka, topic))
        want = Counter({k: n for k, n in expected.items() if k[0] == topic})
        _diff(check, want, got, _show_output)
        report.checks.append(check)
    dlq = TopicCheck(pipe.dead_letter_topic)
    got_letters: Counter[tuple[str, int, int]] = Counter()
    for m in await _read(kafka, pipe.dead_letter_topic):
        try:
            doc = json.loads(m.value or b"")
            got_letters[(str(doc["topic"]), int(doc["partition"]), int(doc["offset"]))] += 1
        except (ValueError, KeyError, TypeError):
            dlq.unexpected += 1
            dlq.note(f"not a dead letter: {m.value!r:.120}")
    _diff(dlq, letters, got_letters, lambda t: f"dead letter of {t[0]}[{t[1]}]@{t[2]}")
    report.checks.append(dlq)
    written = [*sorted(outputs), pipe.dead_letter_topic, pipe.settings.progress_topic, *changelogs]
    report.open_transactions = await open_transactions(kafka, dict.fromkeys(written))
    report.seconds = time.monotonic() - started
    report.peak_rss_mb = _peak_rss_mb()
    return report
