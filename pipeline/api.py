"""Your own exactly-once transformation: the public API.

A :class:`Pipeline` is a Faust app with the exactly-once engine under it. Each stage you
declare with :meth:`Pipeline.stage` reads one topic and, for every record, in order:

1. parses it: ``parse(value)`` (or, with ``parse=Keyed(fn)``, ``fn(value, key)``)
   returns your event, or :class:`Invalid` with a reason, and an invalid record goes to
   the dead-letter topic with that reason (so does a record whose handling raised three
   times);
2. drops it if it copies an event accepted within the dedup window (``dedup=``): the
   window runs on each record's arrival, the broker's append time of its source topic;
3. calls your operator, a pure function: ``event -> outputs``, or, with ``state=``,
   ``(state, event) -> (state, outputs)`` on the state of ``key(event)`` (``None`` when
   there is none yet; return ``None`` to delete it, or the state it was given to leave
   it as it is, unwritten);
4. sends the outputs, :class:`Emit` records to topics the stage declared.

Everything a batch of records does (outputs, dead letters, state and dedup writes) is
committed in one Kafka transaction together with their source offsets. A crash, a
frozen worker, a broker restart or a rebalance never applies a record twice or loses
one; the operator must not have side effects of its own (see ``docs/guarantees.md``).

State and dedup live in tables partitioned like the stage's source topic: every record
of one key must arrive in one partition. If the source is not keyed that way, give
``partition_by``: the stage then first forwards each valid record, keyed by
``partition_by(event)``, through an internal topic of its own.

:meth:`Pipeline.dedup` declares a stage with no operator, which forwards each event once.
The order pipeline (:mod:`pipeline.topology`) is declared with both.

Run it as any Faust app: ``faust -A yourmodule worker``, where ``yourmodule.app`` is
:attr:`Pipeline.app`. Settings come from ``PIPELINE_*`` variables as for the order
pipeline (:class:`pipeline.settings.Settings`); ``PIPELINE_TOPIC_PREFIX`` goes before
every topic name the pipeline declares.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, NamedTuple, TypeVar, overload

from pipeline.admin import LARGE_CONFIG, RAW_CONFIG
from pipeline.agents.dedup import WindowedDedup
from pipeline.agents.sending import agent_for, direct_send
from pipeline.agents.sending import dead_letters as dead_letters_to
from pipeline.domain.route import EID, SRC, source_header
from pipeline.eos.faust.store import TransactionalStore
from pipeline.eos.stage import Out, Stage
from pipeline.factory import PipelineApp, create_app
from pipeline.settings import Settings
from pipeline.web import install_common, state_view

__all__ = [
    "ID_HEADER",
    "JSON",
    "SOURCE_HEADER",
    "Codec",
    "Dedup",
    "Emit",
    "Invalid",
    "Keyed",
    "Pipeline",
    "StageInfo",
]

E = TypeVar("E")
S = TypeVar("S")

#: The header that names where a forwarded record came from (``"<partition>:<offset>"``
#: of the stage's source topic), as the order pipeline's route stage writes it.
SOURCE_HEADER = SRC
#: The header in which the hop of a :meth:`Pipeline.dedup` stage passes an event's
#: idempotency key on (the order pipeline's ``event_id`` header).
ID_HEADER = EID


@dataclass(frozen=True, slots=True)
class Invalid:
    """What ``parse`` returns for a record that is not a valid event: it goes to the
    dead-letter topic with ``reason``."""

    reason: str


class Emit(NamedTuple):
    """An output record. ``topic`` must be one of the stage's ``outputs``. (A named
    tuple: an operator makes several per event, and a frozen dataclass's ``__init__``
    costs a ``setattr`` call per field.)"""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Dedup(Generic[E]):
    """Drop copies of an event: two records are copies when ``key`` gives both the same
    idempotency key and the later one arrived within ``window`` of the first. ``grace``
    keeps an expired key a little longer, for copies that reach the stage late because
    another partition of the source lags (see ``docs/dedup-window.md``)."""

    key: Callable[[E], bytes]
    window: timedelta
    grace: timedelta = timedelta(0)


@dataclass(frozen=True, slots=True)
class Codec(Generic[S]):
    """How a stage's state is stored: ``encode`` to bytes and ``decode`` back. ``show``
    turns a decoded state into what ``json.dumps`` takes, for the state's web view
    (``GET /stages/<stage>/state/<key>``); by default the decoded state itself."""

    encode: Callable[[S], bytes]
    decode: Callable[[bytes], S]
    show: Callable[[S], Any] | None = None


def _json_encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


#: State as JSON (dicts, lists, strings, numbers).
JSON: Codec[Any] = Codec(_json_encode, json.loads)

Stateless = Callable[[E], Iterable[Emit]]
Stateful = Callable[[S | None, E], tuple[S | None, Iterable[Emit]]]


@dataclass(frozen=True, slots=True)
class Keyed(Generic[E]):
    """``parse=Keyed(fn)``: ``fn(value, key)`` judges a record with its key too (``None``
    when the record has none), as a contract that ties the key to a field needs."""

    parse: Callable[[bytes, bytes | None], E | Invalid]


#: What ``parse=`` takes: a function of the value, or :class:`Keyed`.
Parse = Callable[[bytes], E | Invalid] | Keyed[E]


def _by_record(parse: Parse[Any]) -> Callable[[bytes, bytes | None], Any]:
    """``parse`` as a function of a record's value and key."""
    if isinstance(parse, Keyed):
        return parse.parse
    by_value = parse
    return lambda value, key: by_value(value)


@dataclass(frozen=True, slots=True)
class StageInfo:
    """A declared stage, as tools (``reconcile``, ``chaos``, tests) read it."""

    name: str
    #: the topic it reads, and where its records go after partitioning (the same topic
    #: without ``partition_by``)
    source: str
    processed_from: str
    outputs: tuple[str, ...]
    #: the Faust table names of its dedup and its state, if any
    dedup_table: str | None
    state_table: str | None
    #: ``parse`` as a function of a record's value and key
    parse: Callable[[bytes, bytes | None], Any]
    dedup: Dedup[Any] | None
    partition_by: Callable[[Any], bytes] | None
    key: Callable[[Any], bytes] | None
    state: Codec[Any] | None
    #: the operator, or None for a stage of :meth:`Pipeline.dedup`, which forwards
    #: each accepted record unchanged to ``outputs[0]``
    operator: Callable[..., Any] | None


class Pipeline:
    """A Faust app whose stages are exactly-once; declare them with :meth:`stage`.

    ``name`` is the app id (the consumer group, the prefix of internal topics and
    transactional ids) unless ``PIPELINE_APP_ID`` sets another. ``dead_letters`` is the
    dead-letter topic, ``"<name>.dlq"`` if not given. ``page`` is an HTML page served at
    ``/`` (the order pipeline's dashboard); without one, Faust's ``{"status": "OK"}``.
    """

    def __init__(
        self,
        name: str,
        *,
        dead_letters: str | None = None,
        settings: Settings | None = None,
        page: str | None = None,
    ) -> None:
        if settings is None:
            # An explicit PIPELINE_APP_ID wins, so that one module can run as several
            # pipelines (a test's, a staging one) side by side.
            settings = Settings() if "PIPELINE_APP_ID" in os.environ else Settings(app_id=name)
        self.settings = settings
        self.app: PipelineApp = create_app(settings)
        self.app.order_topics = False
        install_common(self.app, page)
        self.app.eos.send_direct = direct_send(self.app)
        self.dead_letter_topic = self.topic_name(dead_letters or f"{name}.dlq")
        self._dead_letter = dead_letters_to(self.app, self.dead_letter_topic)
        #: the topics declared, by name (the Faust topic an agent reads)
        self._topics: dict[str, Any] = {}
        #: every topic a stage of the pipeline writes: a stage reading one of them reads
        #: the pipeline's own records, not its input (``seen`` counts the input)
        self._written: set[str] = {self.dead_letter_topic}
        #: the Faust tables of the stages' state and dedup, by name
        self.tables: dict[str, Any] = {}
        self._declare(self.dead_letter_topic, {})
        self.stages: dict[str, StageInfo] = {}

    def topic_name(self, name: str) -> str:
        """The broker's name of a topic the pipeline declares (``PIPELINE_TOPIC_PREFIX``
        before it)."""
        return self.settings.topic_prefix + name

    @overload
    def stage(
        self,
        name: str,
        *,
        source: str,
        parse: Parse[E],
        outputs: Sequence[str],
        dedup: Dedup[E] | None = None,
        partition_by: Callable[[E], bytes] | None = None,
        through: str | None = None,
    ) -> Callable[[Stateless[E]], Stateless[E]]: ...

    @overload
    def stage(
        self,
        name: str,
        *,
        source: str,
        parse: Parse[E],
        outputs: Sequence[str],
        key: Callable[[E], bytes],
        state: Codec[S],
        dedup: Dedup[E] | None = None,
        partition_by: Callable[[E], bytes] | None = None,
        table: str | None = None,
        through: str | None = None,
    ) -> Callable[[Stateful[S, E]], Stateful[S, E]]: ...

    def stage(
        self,
        name: str,
        *,
        source: str,
        parse: Parse[Any],
        outputs: Sequence[str],
        key: Callable[[Any], bytes] | None = None,
        state: Codec[Any] | None = None,
        dedup: Dedup[Any] | None = None,
        partition_by: Callable[[Any], bytes] | None = None,
        table: str | None = None,
        through: str | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Declare a stage (see the module docstring); decorates its operator.

        ``table`` names the state's table (default: the stage's name) and ``through``
        the internal topic of ``partition_by`` (default ``<app>-<stage>-repartition``):
        renaming either after a deployment ran would lose the state, or the records in
        flight, that the old name holds.
        """
        self._check(name)
        if (key is None) != (state is None):
            raise ValueError("a stateful stage needs both key= and state=")
        if table is not None and state is None:
            raise ValueError("table= names a stateful stage's state table")

        def declare(operator: Callable[..., Any]) -> Callable[..., Any]:
            self._wire(
                name, source, _by_record(parse), outputs, key, state, dedup, partition_by,
                operator, table or name, through,
            )  # fmt: skip
            return operator

        return declare

    def dedup(
        self,
        name: str,
        *,
        source: str,
        parse: Parse[E],
        dedup: Dedup[E],
        to: str,
        partition_by: Callable[[E], bytes] | None = None,
        table: str | None = None,
        through: str | None = None,
    ) -> StageInfo:
        """Declare a stage that forwards each event once: every valid record of
        ``source`` that is no copy of an event accepted within the window goes to
        ``to`` unchanged (its value; its key, or ``partition_by(event)``; its arrival as
        its timestamp; its place in ``source`` in the :data:`SOURCE_HEADER` header). The
        seed's broker-side dedup stage, in one declaration.

        With ``partition_by``, the event's idempotency key travels with it through the
        internal topic, so that the stage after it reads the window without parsing
        the record again. ``table`` names the dedup table (default
        ``<stage>-dedup``).
        """
        self._check(name)
        self._wire(
            name, source, _by_record(parse), [to], None, None, dedup, partition_by, None,
            table or f"{name}-dedup", through,
        )  # fmt: skip
        return self.stages[name]

    def _check(self, name: str) -> None:
        if name in self.stages:
            raise ValueError(f"a stage named {name!r} is declared already")
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"stage name {name!r}: letters, digits, '-' and '_' only")

    # -- wiring onto the engine ----------------------------------------------------

    def _declare(self, topic: str, config: dict[str, str]) -> None:
        app = self.app
        if topic in self._topics:
            return
        app.topic_overrides[topic] = config
        declared = self._topics[topic] = app.topic(
            topic,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=self.settings.partitions,
        )
        app.declared_topics.append(declared)

    def _table(self, name: str, dedup: bool = False) -> Any:
        table = self.tables[name] = self.app.Table(
            name,
            # bytes keys and values: Faust's "raw" serializer, no codec of its own.
            key_type=bytes,
            value_type=bytes,
            partitions=self.settings.partitions,
            # A dedup table's tombstones (expired ids) must outlive a restore that reads
            # the changelog while compaction runs; the broker's default could be less.
            extra_topic_configs={"delete.retention.ms": str(24 * 3600 * 1000)} if dedup else {},
        )
        assert isinstance(table.data, TransactionalStore)
        return table

    def _wire(
        self,
        name: str,
        source: str,
        parse: Callable[[bytes, bytes | None], Any],
        outputs: Sequence[str],
        key: Callable[[Any], bytes] | None,
        state: Codec[Any] | None,
        dedup: Dedup[Any] | None,
        partition_by: Callable[[Any], bytes] | None,
        operator: Callable[..., Any] | None,
        table: str,
        through: str | None,
    ) -> None:
        app, settings = self.app, self.settings
        source_topic = self.topic_name(source)
        # The dedup window runs on arrival: the source keeps the broker's append time.
        self._declare(source_topic, RAW_CONFIG if dedup is not None else LARGE_CONFIG)
        outs = tuple(self.topic_name(t) for t in outputs)
        for topic in outs:
            # A forwarding stage's output carries its input values whole.
            self._declare(topic, LARGE_CONFIG if operator is None else {})
        self._written.update(outs)
        processed_from = source_topic
        if partition_by is not None:
            processed_from = through or f"{settings.app_id}-{name}-repartition"
            self._declare(processed_from, LARGE_CONFIG)
            self._written.add(processed_from)
            route = self._route_stage(
                name, source_topic, processed_from, parse, partition_by, dedup
            )
            self._add(route)
        if dedup is not None or state is not None or partition_by is not None:
            # Tables are partitioned like the topic the stage processes (a source with
            # partition_by may have any count: it is forwarded first).
            app.keyed_topics.append(processed_from)
        if dedup is not None:
            app.append_time_topics.append(source_topic)
        dedup_table = table if operator is None else f"{name}-dedup"
        dedup_store = self._table(dedup_table, dedup=True).data if dedup is not None else None
        state_table = self._table(table) if state is not None else None
        state_store = state_table.data if state_table is not None else None
        if state_table is not None:
            assert state is not None
            state_view(self.app, name, state_table, state)
        for store in (dedup_store, state_store):
            if store is not None:
                app.eos.register_store(processed_from, store)
        window = None
        if dedup is not None:
            assert dedup_store is not None
            window = WindowedDedup(
                dedup_store,
                round(dedup.window.total_seconds() * 1000),
                round(dedup.grace.total_seconds() * 1000),
                settings.expiry_batch,
                settings.expiry_every,
                app.stats,
                # A forwarding stage escapes only ids that could meet the table's own
                # rows; a stage's ids all take a prefix (the format it has always had).
                prefix=b"" if operator is None else b"k",
            )
        if operator is None:
            assert window is not None and dedup is not None
            handle = self._forward(
                source_topic, parse, outs[0], dedup, window, hop=partition_by is not None
            )
        else:
            handle = self._handle(
                name, source_topic, parse, dict(zip(outputs, outs, strict=True)), key, state,
                window, dedup, state_store, operator,
                validates=partition_by is None,
            )  # fmt: skip
        self._add(Stage(name, processed_from, handle, self._dead_letter))
        self.stages[name] = StageInfo(
            name,
            source_topic,
            processed_from,
            outs,
            dedup_table if dedup is not None else None,
            table if state is not None else None,
            parse,
            dedup,
            partition_by,
            key,
            state,
            operator,
        )

    def _add(self, stage: Stage) -> None:
        app = self.app
        app.eos.register_source(stage.topic)
        app.agent(self._topics[stage.topic], name=stage.name)(agent_for(app, stage))

    def _route_stage(
        self,
        name: str,
        source: str,
        target: str,
        parse: Callable[[bytes, bytes | None], Any],
        partition_by: Callable[[Any], bytes],
        dedup: Dedup[Any] | None,
    ) -> Stage:
        """The hop that validates and forwards each record keyed by ``partition_by``,
        keeping its arrival as its timestamp, its place in a header, and its
        idempotency key in another (read by a forwarding dedup stage)."""
        stats = self.app.stats
        dead_letter = self._dead_letter
        written = self._written
        id_of = dedup.key if dedup is not None else None

        def handle(record: Any, out: Out) -> None:
            if source not in written:
                stats.seen += 1
            event = parse(record.value or b"", record.key)
            if isinstance(event, Invalid):
                dead_letter(record, event.reason, out)
                return
            headers = [(SOURCE_HEADER, source_header(record.partition, record.offset))]
            if id_of is not None:
                headers.append((ID_HEADER, id_of(event)))
            out.send(target, partition_by(event), record.value, record.timestamp, headers)

        return Stage(f"{name}-route", source, handle, dead_letter)

    def _forward(
        self,
        source: str,
        parse: Callable[[bytes, bytes | None], Any],
        target: str,
        dedup: Dedup[Any],
        window: WindowedDedup,
        hop: bool,
    ) -> Callable[[Any, Out], None]:
        """A stage of :meth:`dedup`: each accepted record on to ``target`` unchanged."""
        stats, outputs = self.app.stats, self.app.stats.outputs
        dead_letter = self._dead_letter
        written = self._written
        id_of = dedup.key

        def handle(record: Any, out: Out) -> None:
            headers = record.headers
            if hop:
                # Validated by the hop, which named the id: nothing to parse here.
                event_id = _header(headers, ID_HEADER)
                src = _header(headers, SOURCE_HEADER)
                if event_id is None:
                    # Not written by the hop: a foreign record on an internal topic.
                    dead_letter(record, f"no {ID_HEADER} header: not a record of the hop", out)
                    return
            else:
                if source not in written:
                    stats.seen += 1
                event = parse(record.value or b"", record.key)
                if isinstance(event, Invalid):
                    dead_letter(record, event.reason, out)
                    return
                event_id = id_of(event)
                src = source_header(record.partition, record.offset)
            arrival_ms = record.timestamp
            if window.offer(out, record.partition, event_id, arrival_ms):
                out.send(
                    target,
                    record.key,
                    record.value,
                    arrival_ms,
                    [(SOURCE_HEADER, src)] if src is not None else None,
                )
                stats.unique += 1
                outputs[target] += 1
            else:
                stats.duplicates_dropped += 1

        return handle

    def _handle(
        self,
        name: str,
        source: str,
        parse: Callable[[bytes, bytes | None], Any],
        outputs: dict[str, str],
        key: Callable[[Any], bytes] | None,
        state: Codec[Any] | None,
        window: WindowedDedup | None,
        dedup: Dedup[Any] | None,
        state_store: TransactionalStore | None,
        operator: Callable[..., Any],
        validates: bool,
    ) -> Callable[[Any, Out], None]:
        stats = self.app.stats
        sent = stats.outputs
        dead_letter = self._dead_letter
        written = self._written

        def handle(record: Any, out: Out) -> None:
            if validates and source not in written:
                stats.seen += 1
            event = parse(record.value or b"", record.key)
            if isinstance(event, Invalid):
                dead_letter(record, event.reason, out)
                return
            if window is not None:
                if not window.offer(
                    out,
                    record.partition,
                    dedup.key(event),  # type: ignore[union-attr]
                    record.timestamp,
                ):
                    stats.duplicates_dropped += 1
                    return
                stats.unique += 1
            if state is None:
                emits = operator(event)
            else:
                assert key is not None and state_store is not None
                k = key(event)
                raw = out.get(state_store, k)
                old = None if raw is None else state.decode(raw)
                new, emits = operator(old, event)
                if new is not old:  # the state it was given back: nothing to write
                    out.put(state_store, k, None if new is None else state.encode(new))
            for emit in emits:
                # declared name -> the broker's (prefixed) name, or None: not an output
                topic = outputs.get(emit.topic)
                if topic is None:
                    raise ValueError(
                        f"stage {name!r} emitted to {emit.topic!r}, not one of its outputs"
                    )
                headers = emit.headers
                out.send(topic, emit.key, emit.value, None, list(headers) if headers else None)
                sent[topic] += 1

        return handle


def _header(headers: Any, name: str) -> bytes | None:
    for k, v in headers or ():
        if k == name:
            return bytes(v)
    return None


def load(target: str) -> Pipeline:
    """The :class:`Pipeline` named ``module:attribute`` (or ``module``, whose ``pipe`` it
    is), imported from the current directory too: what ``--pipeline`` names on the
    command line (``reconcile``, ``status``, ``topics``, ``chaos``)."""
    import importlib
    import sys

    module_name, _, attribute = target.partition(":")
    sys.path.insert(0, os.getcwd())
    found = getattr(importlib.import_module(module_name), attribute or "pipe", None)
    if not isinstance(found, Pipeline):
        raise SystemExit(f"{target}: not a pipeline.api.Pipeline (give module:attribute)")
    return found
