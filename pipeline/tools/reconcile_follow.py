"""``reconcile --follow``: the proof of :mod:`pipeline.tools.reconcile`, kept up to date
beside a running deployment, round after round, with its progress on disk.

Each round reads only what was appended since the last one, folds it into a state kept
in a rocksdict directory (``--state``), judges what can be judged, and writes the state
changes and the new read positions in one ``WriteBatch``: a crash between rounds, or in
the middle of one, neither loses a record nor counts one twice, and a restart goes on
from the last batch written. The verdict is over everything read since the state began.

**The frontier.** The workers run exactly-once: when the app's consumer group has
committed offset X on a stage's input partition, every output of the inputs below X is
committed (in the same transaction). A round

1. reads the group's committed offsets of the four stage inputs (``orders.raw`` for the
   route hop, ``<app>-raw-by-order`` for dedup, ``orders.unique`` for the state machine,
   the deltas topic for balances): the frontier it offers;
2. takes the high watermark of every topic the stages write (all but ``orders.raw``):
   the outputs of the transactions that committed those offsets lie below them;
3. takes every topic's last stable offset, downstream first (changelogs, outputs, dead
   letters, ``orders.unique``, the rekeyed topic, ``orders.raw`` last), so that every
   record read has its cause among the records read;
4. reads each topic from its checkpoint to that offset, upstream first;
5. moves the frontier to each offered one (its own, or an earlier round's still
   waiting) whose high watermarks of step 2 every topic has now been read up to.

Step 5 is why committed is not enough. A ``read_committed`` reader stops at the last
stable offset: the first record of the oldest transaction still open on the partition.
Another producer's open transaction (another source partition's, or a ``kill -9``-ed
worker's, open until the next owner of its partition aborts it) hides the committed
outputs after its first record, although their inputs' offsets are committed: judged
then, they would look lost. An offered frontier waits, on disk, until that transaction
ends; at most :data:`OFFERS_KEPT` wait (a newer offer replaces the newest waiting one).

Only what lies below the frontier is judged "missing"; an output whose cause is past it
is pending, and judged once the frontier passes. What each check compares:

* a valid raw copy below the hop's frontier must have reached the rekeyed topic (or it
  is a loss); a bad one must have exactly one dead letter, right by ``dlq_problems``;
* the dedup promises of reconcile's docstring (a-d, f) per ``event_id``, over the copies
  the dedup stage has passed (their rekeyed record below its frontier) and every forward
  seen: a forward is counted the moment it is read, a loss only over passed copies;
* per order, the outputs (changes, rejected, coupons, deltas) against reconcile's
  :class:`~pipeline.tools.reconcile.Machine` replayed over the order's forwards, and
  the order's latest ``orders`` changelog row against the replayed row, once the order
  is *settled*: every forward of it read so far is below the state machine's frontier.
  Only then is the comparison safe while the pipeline runs: its outputs and its row are
  all visible, and no later event of it can have changed the row (such an event would
  have been read, from a later snapshot, and the order would not be settled). An order
  that is never quiet between two rounds waits; its outputs are matched as they come;
* per user, each ``users.balances`` changelog row against the sum of the user's first
  ``version`` deltas on the deltas topic (the balances stage applies them in partition
  order); a delta below the balances stage's frontier that no row counts is a loss.

It needs ``PIPELINE_PROCESSING_GUARANTEE=exactly_once`` (the frontier is its promise; a
raw copy rekeyed twice counts as a duplicate). Not covered (the batch ``reconcile``
covers them): the order of the forwards of keyed
copies (e); open transactions (a running pipeline always has some); a dead letter about
a record of another topic than ``orders.raw`` is counted unexpected here (it only exists
when something upstream is already wrong). A raw copy whose rekeyed record was deleted
by retention before the first round is counted lost: start it with the deployment, or
keep ``<app>-raw-by-order`` longer than the follower may lag.

**Memory.** Everything already judged, and everything pending, is on disk. A round holds
in memory the state entries it touches: those of the records it reads, bounded by
``round_records`` records per topic, and those still waiting for the frontier (about the
records past it, the lag). A topic that reaches ``round_records`` ends the round's
reading there (the topics downstream of it wait for the next round, so causes are still
read before their effects) and such a partial round judges nothing; rounds then follow
each other without a pause until the follower has caught up. The state on disk grows
with the distinct events, orders and users (nothing is forgotten yet).

The counts and the first few examples of each check are kept over all rounds; a state
directory names the topics it follows and refuses others. Records a topic's retention
deleted before they were read are skipped (the reader starts at the log's start), and
their effects then look unexpected: keep the retention longer than the follower may stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from rocksdict import Options, Rdict, WriteBatch

from pipeline.domain.codecs import REASON_MAX_BYTES
from pipeline.kafka_io import committed_offsets, ends_of, partitions_of
from pipeline.settings import Settings
from pipeline.tools.reconcile import (
    SRC_HEADER,
    Event,
    Machine,
    OrderRow,
    Record,
    Report,
    TopicCheck,
    copy_digest,
    dedup_faults,
    diff_order,
    dlq_problems,
    same_json,
    src_of,
    validate,
    write_metrics,
)

KINDS = ("changes", "rejected", "coupons", "deltas")
#: records read per topic in one round before the round stops reading (see the docstring)
ROUND_RECORDS = 50_000
#: frontiers offered and waiting for open transactions to end (see the docstring): only
#: the granularity of a long wait is lost by keeping few
OFFERS_KEPT = 8
_PART = struct.Struct(">I")
_WHERE = struct.Struct(">IQ")


# -- the state on disk -------------------------------------------------------------------

_GONE = object()


class State:
    """A rocksdict directory of pickled values, changed in memory during a round and
    written at :meth:`commit` in one ``WriteBatch``: a round's changes land whole or not
    at all. Only this process reads the values, so pickle's generality costs nothing."""

    def __init__(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.db = Rdict(path, options=Options(raw_mode=True))
        self.dirty: dict[bytes, Any] = {}

    def get(self, key: bytes) -> Any:
        if key in self.dirty:
            value = self.dirty[key]
            return None if value is _GONE else value
        raw = self.db.get(key)
        if raw is None:
            return None
        value = pickle.loads(raw)
        # Kept, so that a caller changing it in place and a later get agree.
        self.dirty[key] = value
        return value

    def put(self, key: bytes, value: Any) -> None:
        self.dirty[key] = value

    def delete(self, key: bytes) -> None:
        self.dirty[key] = _GONE

    def keys(self, prefix: bytes) -> list[bytes]:
        """The keys under ``prefix``, this round's changes included, in order."""
        found: set[bytes] = set()
        it = self.db.iter()
        it.seek(prefix)
        while it.valid():
            key = it.key()
            if not key.startswith(prefix):
                break
            found.add(key)
            it.next()
        for key, value in self.dirty.items():
            if key.startswith(prefix):
                if value is _GONE:
                    found.discard(key)
                else:
                    found.add(key)
        return sorted(found)

    def commit(self) -> None:
        batch = WriteBatch(raw_mode=True)
        for key, value in self.dirty.items():
            if value is _GONE:
                batch.delete(key)
            else:
                batch.put(key, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        self.db.write(batch)
        self.dirty.clear()

    def rollback(self) -> None:
        self.dirty.clear()

    def close(self) -> None:
        self.dirty.clear()
        self.db.close()


# Key spaces: one leading byte each.
_POS, _FRONT, _OFFERS, _EVENT, _ORDER, _USER, _SUBJECT, _TODO, _TOTALS, _NAMES = (
    b"p",
    b"f",
    b"w",
    b"e",
    b"k",
    b"u",
    b"x",
    b"q",
    b"s",
    b"n",
)


class StateMismatch(Exception):
    """The state directory belongs to another deployment's topics."""


def _where(topic: str, partition: int, offset: int) -> bytes:
    return topic.encode() + b"\x00" + _WHERE.pack(partition, offset)


def _unwhere(raw: bytes) -> tuple[str, int, int]:
    # The fixed-size tail first: its bytes may be NUL too.
    p, o = _WHERE.unpack(raw[-_WHERE.size :])
    return raw[: -_WHERE.size - 1].decode(), p, o


# -- comparing outputs ----------------------------------------------------------------------


def _canonical(key: bytes | None, doc: Any) -> bytes:
    # The form reconcile's Machine gives its expected records in: key, NUL, JSON with
    # sorted keys (orjson keeps 1, 1.0 and true apart). Written again on purpose; the
    # unit tests feed outputs made by the workers' own operators, so a drift shows.
    return (
        (key if key is not None else b"<no key>")
        + b"\x00"
        + orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    )


class _Expected:
    """Takes the Machine's expected records of one kind for the event being replayed."""

    def __init__(self, kind: str, into: list[tuple[str, str, bytes]]) -> None:
        self.kind = kind
        self.into = into

    def expect(self, order: str, item: tuple[str, bytes]) -> None:
        self.into.append((self.kind, item[0], item[1]))


def _row_of(doc: dict[str, Any] | None) -> OrderRow | None:
    if doc is None:
        return None
    row = OrderRow(doc["order_id"], doc["user_id"], doc["amount_cents"], doc["updated_ms"])
    row.status, row.version, row.paid_cents = doc["status"], doc["version"], doc["paid_cents"]
    return row


# -- the incremental checks -----------------------------------------------------------------


class Follower:
    """The checks, fed records round by round (``on_*``), judged at :meth:`judge`, and
    made durable with :meth:`commit`. Pure apart from its :class:`State`: the unit tests
    feed it directly."""

    def __init__(self, settings: Settings, state: State) -> None:
        s = settings
        self.state = state
        self.window_ms = s.dedup_window_ms
        self.raw_topic = s.topic_raw
        self.by_order_topic = s.by_order_topic
        self.unique_topic = s.topic_unique
        self.kinds = {
            "changes": s.topic_changes,
            "rejected": s.topic_rejected,
            "coupons": s.topic_coupons,
            "deltas": s.deltas_topic,
        }
        self.changelogs = {
            "orders": f"{s.app_id}-orders-changelog",
            "balances": f"{s.app_id}-users.balances-changelog",
        }
        #: the stage inputs whose committed offsets make the frontier
        self.stage_inputs = {
            "raw": s.topic_raw,
            "by_order": s.by_order_topic,
            "unique": s.topic_unique,
            "deltas": s.deltas_topic,
        }
        names = [*self.stage_inputs.values(), s.topic_dlq, *self.kinds.values()]
        names += self.changelogs.values()
        known = state.get(_NAMES)
        if known is not None and known != names:
            # Offsets of other topics would be taken for these: refuse, do not guess.
            raise StateMismatch(
                f"the state in {state.path} follows other topics ({', '.join(known[:3])}, ...)"
            )
        state.put(_NAMES, names)
        totals = state.get(_TOTALS) or {
            "round": 0,
            "input": 0,
            "checks": [
                {"topic": t}
                for t in (
                    s.topic_unique,
                    s.topic_dlq,
                    *self.kinds.values(),
                    *self.changelogs.values(),
                )
            ],
        }
        # Stored as plain fields, not pickled TopicChecks: a state outlives the class.
        known_fields = {f.name for f in fields(TopicCheck)}
        checks = [
            TopicCheck(**{k: v for k, v in c.items() if k in known_fields})
            for c in totals["checks"]
        ]
        self.totals = {**totals, "checks": checks}
        self.unique, self.dlq = checks[0], checks[1]
        self.outputs = dict(zip(KINDS, checks[2:6], strict=True))
        self.tables = dict(zip(self.changelogs, checks[6:8], strict=True))
        self.frontier: dict[str, dict[int, int]] = state.get(_FRONT) or {
            name: {} for name in self.stage_inputs
        }

    def feeds(self) -> list[tuple[str, Callable[[Record], None]]]:
        """Every topic read, upstream first, with what takes its records."""
        return [
            (self.raw_topic, self.on_raw),
            (self.by_order_topic, self.on_by_order),
            (self.unique_topic, self.on_unique),
            (self.dlq.topic, self.on_dlq),
            *((t, _bind(self.on_output, k)) for k, t in self.kinds.items()),
            *((t, _bind(self.on_table, k)) for k, t in self.changelogs.items()),
        ]

    # -- positions and the frontier
    def _positions(self, topic: str) -> dict[int, tuple[int, int]]:
        prefix = _POS + topic.encode() + b"\x00"
        return {
            _PART.unpack(k[len(prefix) :])[0]: self.state.get(k) for k in self.state.keys(prefix)
        }

    def position(self, topic: str) -> dict[int, int]:
        """Per partition, the next offset to read (from the state)."""
        return {p: pos[0] for p, pos in self._positions(topic).items()}

    def set_position(
        self, topic: str, partition: int, offset: int, last_record: int | None = None
    ) -> None:
        """The next offset to read, and the offset after the last record read (None:
        no record read since the last time, only transaction markers)."""
        key = _POS + topic.encode() + b"\x00" + _PART.pack(partition)
        if last_record is None:
            before = self.state.get(key)
            last_record = before[1] if before is not None else 0
        self.state.put(key, (offset, last_record))

    def advance(
        self, committed: dict[str, dict[int, int]], high: dict[str, dict[int, int]]
    ) -> None:
        """Offer the group's committed offsets (per stage input name) as the frontier,
        with the high watermarks (per topic) taken after them; then move the frontier to
        every offer, oldest first, whose high watermarks have all been read up to (call
        after a round that read to the end). Never past what has been read of a stage's
        input, never backwards."""
        offers: list[tuple[dict[str, dict[int, int]], dict[str, dict[int, int]]]]
        offers = self.state.get(_OFFERS) or []
        offers.append((committed, high))
        if len(offers) > OFFERS_KEPT:
            del offers[-2]
        while offers and self._read_up_to(offers[0][1]):
            self._move(offers.pop(0)[0])
        self.state.put(_OFFERS, offers)

    def _read_up_to(self, high: dict[str, dict[int, int]]) -> bool:
        for topic, ends in high.items():
            read = self.position(topic)
            if any(read.get(p, 0) < end for p, end in ends.items()):
                return False
        return True

    def _move(self, committed: dict[str, dict[int, int]]) -> None:
        for name, offsets in committed.items():
            read = self.position(self.stage_inputs[name])
            mine = self.frontier.setdefault(name, {})
            for p, off in offsets.items():
                mine[p] = max(mine.get(p, 0), min(off, read.get(p, 0)))
        self.state.put(_FRONT, self.frontier)

    def lag(self) -> int:
        """Records read but past the frontier (up to the last record read: a drained
        stage has committed its last record, not the commit marker after it; markers
        between records count as records)."""
        total = 0
        for name, topic in self.stage_inputs.items():
            front = self.frontier.get(name, {})
            for p, (_, last) in self._positions(topic).items():
                total += max(0, last - front.get(p, 0))
        return total

    def _below(self, name: str, partition: int, offset: int) -> bool:
        return offset < self.frontier.get(name, {}).get(partition, 0)

    def _todo(self, space: bytes, ident: bytes) -> None:
        self.state.put(_TODO + space + ident, True)

    # -- orders.raw
    def on_raw(self, m: Record) -> None:
        self.totals["input"] += 1
        event = validate(m.value, m.key)
        if isinstance(event, str):
            where = _where(self.raw_topic, m.partition, m.offset)
            subject = self._subject(where)
            subject["bad"] = (m.key, m.value)
            self.state.put(_SUBJECT + where, subject)
            self._todo(_SUBJECT, where)
            return
        key = _EVENT + event.event_id.encode()
        entry = self.state.get(key) or {"c": [], "f": [], "d": 0, "l": 0}
        # A copy: partition, offset, arrival, digest, rekeyed at (partition, offset) or
        # -1, and 0 while open, 1 once passed by the dedup stage, 2 once lost at the hop.
        entry["c"].append([m.partition, m.offset, m.timestamp, copy_digest(m.value), -1, -1, 0])
        self.state.put(key, entry)
        self._todo(_EVENT, event.event_id.encode())

    # -- <app>-raw-by-order: where the dedup stage reads each valid copy
    def on_by_order(self, m: Record) -> None:
        event = validate(m.value, None)
        src = src_of(m.headers)
        name = f"{self.by_order_topic}:{m.partition}:{m.offset}"
        if isinstance(event, str) or src is None:
            self.unique.unexpected += 1
            self.unique.note(f"{name}: not the rekeyed copy of a valid input record")
            return
        key = _EVENT + event.event_id.encode()
        entry = self.state.get(key)
        copy = _copy_at(entry, src)
        if entry is None or copy is None:
            self.unique.unexpected += 1
            self.unique.note(f"{name}: rekeys {self.raw_topic}:{src[0]}:{src[1]}, no such copy")
            return
        if copy[4] >= 0:
            self.unique.duplicates += 1
            self.unique.note(f"{name}: {self.raw_topic}:{src[0]}:{src[1]} rekeyed again")
            return
        copy[4], copy[5] = m.partition, m.offset
        self.state.put(key, entry)
        self._todo(_EVENT, event.event_id.encode())

    # -- orders.unique: the forwards, and the state machine's input
    def on_unique(self, m: Record) -> None:
        uc = self.unique
        uc.actual += 1
        name = f"{self.unique_topic}:{m.partition}:{m.offset}"
        event = validate(m.value, None)
        if isinstance(event, str):
            uc.unexpected += 1
            uc.note(f"{name}: not a valid event ({event})")
            return
        keyed_right = m.key == event.order_id.encode()
        if not keyed_right:
            uc.mismatched += 1
            uc.note(f"{name}: event {event.event_id} keyed {m.key!r}, not by its order_id")
        src = src_of(m.headers)
        key = _EVENT + event.event_id.encode()
        entry = self.state.get(key)
        copy = _copy_at(entry, src) if src is not None else None
        if entry is None or src is None or copy is None:
            uc.unexpected += 1
            uc.note(f"{name}: event {event.event_id} forwards no copy of it ({SRC_HEADER} {src})")
        elif any((f[0], f[1]) == src for f in entry["f"]):
            uc.duplicates += 1
            uc.note(f"{name}: the copy at {self.raw_topic}:{src[0]}:{src[1]} forwarded again")
        else:
            if copy[3] != copy_digest(m.value) or copy[2] != m.timestamp:
                uc.mismatched += 1
                uc.note(
                    f"{name}: not the copy at {self.raw_topic}:{src[0]}:{src[1]} "
                    + (
                        "(other bytes)"
                        if copy[3] != copy_digest(m.value)
                        else f"(timestamp {m.timestamp})"
                    )
                )
            entry["f"].append([src[0], src[1], m.partition, m.offset])
            self.state.put(key, entry)
            self._todo(_EVENT, event.event_id.encode())
        if m.key is None or keyed_right:
            self._replay(event, m.partition, m.offset)

    def _order(self, order_id: str) -> dict[str, Any]:
        entry: dict[str, Any] | None = self.state.get(_ORDER + order_id.encode())
        if entry is None:
            entry = {
                "row": None,
                "want": {k: [] for k in KINDS},
                "got": {k: [] for k in KINDS},
                "done": {k: set() for k in KINDS},
                "at": {},
                "log": None,
                "logged": False,
                "table": False,
            }
        return entry

    def _replay(self, event: Event, partition: int, offset: int) -> None:
        entry = self._order(event.order_id)
        expected: list[tuple[str, str, bytes]] = []
        # The recorder stands in for reconcile's Sequences: Machine only calls expect().
        recorders: dict[str, Any] = {k: _Expected(k, expected) for k in KINDS}
        machine = Machine(recorders)
        row = _row_of(entry["row"])
        if row is not None:
            machine.orders[event.order_id] = row
        machine.apply(event)
        after = machine.orders.get(event.order_id)
        entry["row"] = after.to_json() if after is not None else None
        for kind, ident, body in expected:
            self.outputs[kind].expected += 1
            entry["want"][kind].append((ident, body))
            _match(entry, kind)
        at = entry["at"]
        at[partition] = max(at.get(partition, -1), offset)
        entry["table"] = True
        self.state.put(_ORDER + event.order_id.encode(), entry)
        self._todo(_ORDER, event.order_id.encode())

    # -- orders.dlq
    def _subject(self, where: bytes) -> dict[str, Any]:
        subject: dict[str, Any] | None = self.state.get(_SUBJECT + where)
        return subject or {"bad": None, "letters": [], "judged": False, "was_bad": False}

    def on_dlq(self, m: Record) -> None:
        self.dlq.actual += 1
        try:
            doc = orjson.loads(m.value or b"")
            topic, p, o = doc["topic"], doc["partition"], doc["offset"]
            # Bounded too: the coordinates become a fixed-size key.
            if not (
                type(topic) is str
                and "\x00" not in topic
                and type(p) is int
                and type(o) is int
                and 0 <= p < 2**32
                and 0 <= o < 2**63
            ):
                raise TypeError(topic)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.dlq.unexpected += 1
            self.dlq.note(f"undecodable dead letter at {m.partition}:{m.offset}")
            return
        where = _where(topic, p, o)
        subject = self._subject(where)
        if subject["judged"]:
            # Its subject was judged in an earlier round: one more letter is one too many.
            if subject["was_bad"]:
                self.dlq.duplicates += 1
            else:
                self.dlq.unexpected += 1
            self.dlq.note(f"another dead letter for {topic}:{p}:{o}, after it was judged")
            return
        subject["letters"].append((m.key, m.value))
        self.state.put(_SUBJECT + where, subject)
        self._todo(_SUBJECT, where)

    # -- changes, rejected, coupons, deltas
    def on_output(self, kind: str, m: Record) -> None:
        check = self.outputs[kind]
        check.actual += 1
        try:
            doc = orjson.loads(m.value or b"")
            order = doc["order_id"]
            if type(order) is not str:
                raise TypeError(order)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            check.unexpected += 1
            check.note(f"undecodable record at {m.partition}:{m.offset}")
            return
        if kind == "rejected":
            reason = doc.get("reason")
            # Only the reason's presence and bound are the contract's (as in reconcile).
            if type(reason) is str and reason and len(reason.encode()) <= REASON_MAX_BYTES:
                doc["reason"] = True
        ident = "coupon" if kind == "coupons" else str(doc.get("event_id"))
        entry = self._order(order)
        entry["got"][kind].append((ident, _canonical(m.key, doc)))
        _match(entry, kind)
        self.state.put(_ORDER + order.encode(), entry)
        self._todo(_ORDER, order.encode())
        if kind == "deltas":
            self._queue_delta(doc, m)

    def _queue_delta(self, doc: dict[str, Any], m: Record) -> None:
        user, cents, paid = doc.get("user_id"), doc.get("delta_cents"), doc.get("paid_orders")
        if type(user) is not str or type(cents) is not int or type(paid) is not int:
            return  # the per-order comparison already finds it wrong
        entry = self._user(user)
        entry["queue"].append((m.partition, m.offset, cents, paid))
        self.state.put(_USER + user.encode(), entry)
        self._todo(_USER, user.encode())

    def _user(self, user: str) -> dict[str, Any]:
        entry: dict[str, Any] | None = self.state.get(_USER + user.encode())
        return entry or {"queue": [], "version": 0, "cents": 0, "paid": 0}

    # -- the tables' changelogs
    def on_table(self, table: str, m: Record) -> None:
        check = self.tables[table]
        check.actual += 1
        if m.key is None:
            check.unexpected += 1
            check.note(f"a record without a key at {m.partition}:{m.offset}")
            return
        name = m.key.decode("utf-8", errors="replace")
        if table == "orders":
            entry = self._order(name)
            entry["log"], entry["logged"], entry["table"] = m.value, True, True
            self.state.put(_ORDER + m.key, entry)
            self._todo(_ORDER, m.key)
            return
        self._balance_row(check, name, m)

    def _balance_row(self, check: TopicCheck, user: str, m: Record) -> None:
        entry = self._user(user)
        try:
            row = json.loads(m.value) if m.value is not None else None
        except ValueError:
            row = None
        version = row.get("version") if type(row) is dict else None
        if type(version) is not int:
            check.mismatched += 1
            check.note(f"row {user}: {m.value!r:.200}, not a balance")
            return
        check.expected += 1
        need = version - entry["version"]
        queue = entry["queue"]
        if need < 0 or need > len(queue):
            # Went backwards, or counts deltas that are not on the deltas topic.
            check.mismatched += 1
            check.note(
                f"row {user}: version {version} after {entry['version']}, with {len(queue)}"
                " deltas not yet applied"
            )
            need = max(0, min(need, len(queue)))
        for _, _, cents, paid in queue[:need]:
            entry["cents"] += cents
            entry["paid"] += paid
        del queue[:need]
        entry["version"] = version
        want = {
            "user_id": user,
            "balance_cents": entry["cents"],
            "version": version,
            "paid_orders": entry["paid"],
        }
        if not same_json(row, want):
            check.mismatched += 1
            check.note(f"row {user}: {m.value!r:.300}, expected {want}")
        self.state.put(_USER + user.encode(), entry)
        self._todo(_USER, user.encode())

    # -- judging, below the frontier
    def judge(self) -> None:
        """Judge every entry waiting for the frontier; those now behind it leave the
        to-do list (call after :meth:`advance`, in a round that read to the end)."""
        for key in self.state.keys(_TODO):
            space, ident = key[1:2], key[2:]
            if space == _EVENT:
                done = self._judge_event(ident)
            elif space == _ORDER:
                done = self._judge_order(ident)
            elif space == _USER:
                done = self._judge_user(ident)
            else:
                done = self._judge_subject(ident)
            if done:
                self.state.delete(key)

    def _judge_event(self, ident: bytes) -> bool:
        entry = self.state.get(_EVENT + ident)
        if entry is None:
            return True
        forwarded = {(f[0], f[1]) for f in entry["f"]}
        open_left = False
        for copy in entry["c"]:
            if copy[6]:
                continue
            hopped = copy[4] >= 0
            if (copy[0], copy[1]) in forwarded or (
                hopped and self._below("by_order", copy[4], copy[5])
            ):
                copy[6] = 1
            elif copy[4] < 0 and self._below("raw", copy[0], copy[1]):
                copy[6] = 2
                self.unique.missing += 1
                self.unique.note(
                    f"{self.raw_topic}:{copy[0]}:{copy[1]} (event {ident.decode()}): past the"
                    f" hop's committed offset, never rekeyed to {self.by_order_topic}"
                )
            else:
                open_left = True
        passed = [(c[2], (c[0], c[1]) in forwarded) for c in entry["c"] if c[6] == 1]
        dups, losses, note = dedup_faults(passed, self.window_ms) if passed else (0, 0, "")
        if dups > entry["d"] or losses > entry["l"]:
            self.unique.note(f"event {ident.decode()}: {note}")
        self.unique.duplicates += dups - entry["d"]
        self.unique.missing += losses - entry["l"]
        entry["d"], entry["l"] = dups, losses
        self.state.put(_EVENT + ident, entry)
        return not open_left

    def _judge_order(self, ident: bytes) -> bool:
        entry = self.state.get(_ORDER + ident)
        if entry is None:
            return True
        if not all(self._below("unique", p, o) for p, o in entry["at"].items()):
            return False
        order = ident.decode("utf-8", errors="replace")
        for kind in KINDS:
            want, got = entry["want"][kind], entry["got"][kind]
            if want or got:
                diff_order(self.outputs[kind], order, want, got, entry["done"][kind])
                entry["want"][kind], entry["got"][kind] = [], []
        if entry["table"]:
            self._judge_row(order, entry)
            entry["table"] = False
        self.state.put(_ORDER + ident, entry)
        return True

    def _judge_row(self, order: str, entry: dict[str, Any]) -> None:
        check = self.tables["orders"]
        want, raw = entry["row"], entry["log"]
        if want is None:
            if raw is not None:
                check.unexpected += 1
                check.note(f"unexpected row {order}: {raw[:200]!r}")
            return
        check.expected += 1
        if raw is None:
            check.missing += 1
            check.note(f"missing row {order}" + (" (deleted)" if entry["logged"] else ""))
            return
        try:
            got = json.loads(raw)
        except ValueError:
            got = raw
        if not same_json(got, want):
            check.mismatched += 1
            check.note(f"row {order}: {raw[:300].decode(errors='replace')}, expected {want}")

    def _judge_user(self, ident: bytes) -> bool:
        entry = self.state.get(_USER + ident)
        if entry is None:
            return True
        queue = entry["queue"]
        lost = [d for d in queue if self._below("deltas", d[0], d[1])]
        if lost:
            check = self.tables["balances"]
            check.missing += len(lost)
            check.note(
                f"row {ident.decode(errors='replace')}: no version counts the delta at"
                f" {self.kinds['deltas']}:{lost[0][0]}:{lost[0][1]}, which is committed past"
            )
            # Counted once; the row's later versions are then compared without them.
            entry["queue"] = [d for d in queue if d not in lost]
            for _, _, cents, paid in lost:
                entry["version"] += 1
                entry["cents"] += cents
                entry["paid"] += paid
            self.state.put(_USER + ident, entry)
        return not entry["queue"]

    def _judge_subject(self, where: bytes) -> bool:
        subject = self.state.get(_SUBJECT + where)
        if subject is None:
            return True
        topic, p, o = _unwhere(where)
        name = f"{topic}:{p}:{o}"
        dlq = self.dlq
        if topic == self.raw_topic and not self._below("raw", p, o):
            return False
        letters = subject["letters"]
        if subject["bad"] is None:
            if letters:
                dlq.unexpected += len(letters)
                dlq.note(f"a dead letter for {name}, which is not bad input")
        else:
            key, value = subject["bad"]
            dlq.expected += 1
            if not letters:
                dlq.missing += 1
                dlq.note(f"no dead letter for bad input at {name}")
            else:
                if len(letters) > 1:
                    dlq.duplicates += len(letters) - 1
                    dlq.note(f"{len(letters)} dead letters for {name}")
                lkey, lvalue = letters[0]
                problems = dlq_problems(lkey, lvalue, (topic, p, o), key, value)
                if problems:
                    dlq.mismatched += 1
                    dlq.note(f"dead letter for {name}: {'; '.join(problems)}")
        # Only the verdict stays: a later letter for it is then one too many.
        self.state.put(
            _SUBJECT + where,
            {"bad": None, "letters": [], "judged": True, "was_bad": subject["bad"] is not None},
        )
        return True

    # -- the verdict
    def report(self) -> Report:
        uc = self.unique
        # As reconcile counts it: what a correct run would have forwarded.
        uc.expected = uc.actual - uc.duplicates - uc.unexpected + uc.missing
        return Report(input_records=self.totals["input"], checks=list(self.totals["checks"]))

    def commit(self) -> None:
        checks = [dict(c.__dict__, examples=list(c.examples)) for c in self.totals["checks"]]
        self.state.put(_TOTALS, {**self.totals, "checks": checks})
        self.state.commit()


def _copy_at(entry: dict[str, Any] | None, src: tuple[int, int] | None) -> list[Any] | None:
    if entry is None or src is None:
        return None
    for copy in entry["c"]:
        if (copy[0], copy[1]) == src:
            return copy
    return None


def _match(entry: dict[str, Any], kind: str) -> None:
    """Pair an order's expected and actual records of ``kind`` in sequence, as long as
    their heads agree; what is left waits for judgment."""
    want, got, done = entry["want"][kind], entry["got"][kind], entry["done"][kind]
    while want and got and want[0] == got[0]:
        done.add(want[0][0])
        del want[0], got[0]


# -- one round against the broker -----------------------------------------------------------


@dataclass
class Round:
    number: int
    read: dict[str, int] = field(default_factory=dict)
    input_read: int = 0
    complete: bool = True
    lag: int = 0
    seconds: float = 0.0
    report: Report = field(default_factory=Report)

    @property
    def records_read(self) -> int:
        return sum(self.read.values())

    def line(self) -> str:
        r = self.report
        other = sum(c.mismatched + c.unexpected + c.out_of_order for c in r.checks)
        return (
            f"round {self.number}: read {self.records_read} records ({self.input_read} input)"
            f"{'' if self.complete else ', partial'}, frontier lag {self.lag} records;"
            f" verdict {'PASS' if r.ok else 'FAIL'} ({r.duplicates} duplicates,"
            f" {r.losses} losses, {other} other faults, {r.input_records} input records in all)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "round": self.number,
            "records_read": self.records_read,
            "read": self.read,
            "input_read": self.input_read,
            "complete": self.complete,
            "lag_records": self.lag,
            "seconds": round(self.seconds, 2),
            **self.report.as_dict(),
        }


async def _read(
    consumer: AIOKafkaConsumer,
    topic: str,
    start: dict[int, int],
    ends: dict[int, int],
    budget: int,
) -> AsyncIterator[tuple[int, list[ConsumerRecord[bytes, bytes]]]]:
    """The committed records of ``topic`` from ``start`` up to ``ends``, per partition,
    as (partition, batch); stops after ``budget`` records (at a batch's end)."""
    todo = {p: end for p, end in ends.items() if start.get(p, 0) < end}
    if not todo:
        return
    tps = [TopicPartition(topic, p) for p in sorted(todo)]
    consumer.assign(tps)
    for tp in tps:
        # Below the log start (retention), the earliest reset takes over.
        consumer.seek(tp, start.get(tp.partition, 0))
    remaining = set(tps)
    n = 0
    while remaining and n < budget:
        fetched = await consumer.getmany(*remaining, timeout_ms=1000)
        for tp, records in fetched.items():
            end = todo[tp.partition]
            records = [r for r in records if r.offset < end]
            if records:
                n += len(records)
                yield tp.partition, records
        for tp in list(remaining):
            # Positions move past transaction markers too, so compare positions.
            if await consumer.position(tp) >= todo[tp.partition]:
                remaining.discard(tp)


async def run_round(
    follower: Follower, settings: Settings, *, round_records: int = ROUND_RECORDS
) -> Round:
    """One round: the frontier, the snapshots, the reading, the judging, one batch."""
    started = time.monotonic()
    s = settings
    kafka = s.kafka
    follower.totals["round"] += 1
    result = Round(follower.totals["round"])
    committed: dict[str, dict[int, int]] = {}
    for name, topic in follower.stage_inputs.items():
        offsets = await committed_offsets(kafka, s.app_id, topic)
        committed[name] = {p: o or 0 for p, o in offsets.items()}
    feeds = follower.feeds()
    # After the committed offsets: the outputs of the transactions that committed them
    # are below these (step 2).
    high = await ends_of(kafka, [t for t, _ in feeds if t != follower.raw_topic], committed=False)
    consumer = AIOKafkaConsumer(
        **kafka.kwargs(),
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
        max_partition_fetch_bytes=1024 * 1024,
        fetch_max_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        ends: dict[str, dict[int, int]] = {}
        # Downstream first: whatever a later snapshot holds, its causes are in an earlier
        # topic's, taken after it.
        for topic, _ in reversed(feeds):
            parts = await partitions_of(consumer, topic)
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            got = await consumer.end_offsets(tps) if tps else {}
            ends[topic] = {tp.partition: off for tp, off in got.items()}
        for topic, feed in feeds:
            start = follower.position(topic)
            n = 0
            last: dict[int, int] = {}
            async for partition, batch in _read(consumer, topic, start, ends[topic], round_records):
                for m in batch:
                    feed(m)
                n += len(batch)
                last[partition] = batch[-1].offset + 1
            result.read[topic] = n
            finished = n < round_records
            for p, end in ends[topic].items():
                if finished:
                    if end > start.get(p, 0):
                        follower.set_position(topic, p, end, last.get(p))
                elif p in last:
                    follower.set_position(topic, p, last[p], last[p])
            if not finished:
                # The topics downstream wait: their records' causes are not all read.
                result.complete = False
                break
    except BaseException:
        follower.state.rollback()
        raise
    finally:
        await consumer.stop()
    result.input_read = result.read.get(s.topic_raw, 0)
    if result.complete:
        follower.advance(committed, high)
        follower.judge()
    follower.commit()
    result.lag = follower.lag()
    result.report = follower.report()
    result.seconds = result.report.seconds = time.monotonic() - started
    result.report.peak_rss_mb = _peak_rss_mb()
    return result


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bind(method: Callable[[str, Record], None], kind: str) -> Callable[[Record], None]:
    return lambda m: method(kind, m)


def write_follow_metrics(result: Round, path: str) -> None:
    """reconcile's gauges (the ``PipelineReconcile*`` alerts), plus the frontier lag,
    replaced at once in ``path``."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    report = result.report
    scratch = f"{path}.follow"
    write_metrics(report, scratch)
    registry = CollectorRegistry()
    Gauge(
        "pipeline_reconcile_lag_records",
        "Records of the stage inputs read by reconcile --follow but past the frontier",
        registry=registry,
    ).set(result.lag)
    with open(scratch, "ab") as f:
        f.write(generate_latest(registry))
    os.replace(scratch, path)


async def follow(
    settings: Settings,
    *,
    state_dir: str,
    interval: float = 30.0,
    rounds: int | None = None,
    metrics_file: str | None = None,
    as_json: bool = False,
    round_records: int = ROUND_RECORDS,
    out: Callable[[str], None] = print,
) -> int:
    """Rounds until ``rounds`` are done or SIGTERM/SIGINT (after the round's batch is
    written); 0 if the last verdict passed, 1 otherwise."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    state = State(state_dir)
    ok = True
    done = 0
    try:
        try:
            follower = Follower(settings, state)
        except StateMismatch as exc:
            print(f"reconcile --follow: {exc}", file=sys.stderr)
            return 2
        while True:
            result = await run_round(follower, settings, round_records=round_records)
            done += 1
            ok = result.report.ok
            out(orjson.dumps(result.as_dict()).decode() if as_json else result.line())
            if metrics_file:
                write_follow_metrics(result, metrics_file)
            if stop.is_set() or (rounds is not None and done >= rounds):
                break
            if result.complete:
                # A partial round means the follower is behind: the next one at once.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                break
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        state.close()
    return 0 if ok else 1


def default_state_dir(settings: Settings) -> str:
    return os.path.join(".reconcile-follow", settings.app_id)


def main(args: Any, settings: Settings) -> int:
    """``python -m pipeline reconcile --follow`` (its arguments from __main__)."""
    if args.db or args.db_only or args.pipeline:
        print(
            "reconcile --follow checks the order pipeline's topics; it takes no --db,"
            " --db-only or --pipeline",
            file=sys.stderr,
        )
        return 2
    if not settings.exactly_once:
        # Its frontier is exactly-once's promise: a committed offset means visible outputs.
        print(
            "reconcile --follow needs an exactly-once deployment"
            " (PIPELINE_PROCESSING_GUARANTEE=exactly_once); use reconcile",
            file=sys.stderr,
        )
        return 2
    if args.rounds is not None and args.rounds < 1:
        print("reconcile --rounds must be at least 1", file=sys.stderr)
        return 2
    if args.round_records < 1 or args.interval < 0:
        print(
            "reconcile --round-records must be at least 1, --interval not negative", file=sys.stderr
        )
        return 2
    return asyncio.run(
        follow(
            settings,
            state_dir=args.state or default_state_dir(settings),
            interval=args.interval,
            rounds=args.rounds,
            metrics_file=args.metrics_file,
            as_json=args.json,
            round_records=args.round_records,
            out=lambda line: print(line, flush=True),
        )
    )
