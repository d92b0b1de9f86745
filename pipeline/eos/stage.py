"""What a stage is to the engine: a function of one record and an effects context.

A stage reads one source topic. For each record, in order, the engine calls
``handle(record, out)``; the function decides (with pure operators), reads and writes
tables through ``out.get``/``out.put``, and makes outputs with ``out.send``. It does not
await anything and never talks to Kafka: the engine puts its table writes and outputs in
the transaction of the record's source partition, batch by batch, and commits them with
the partition's offset (:mod:`pipeline.eos.commit`).

``record`` has the attributes of aiokafka's ``ConsumerRecord``: ``topic``,
``partition``, ``offset``, ``timestamp`` (ms), ``key``, ``value`` and ``headers`` (a
sequence of ``(str, bytes)``).

A record whose handling raises is handled again after its partition went back to its
last commit (nothing it or the records after that commit did survives); after
:data:`~pipeline.eos.policy.MAX_ATTEMPTS` failures ``dead_letter(record, reason, out)``
is called instead, and its outputs go out in the transaction like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from faust.types import TP

from pipeline.eos.partition import OutRecord

Headers = Sequence[tuple[str, bytes]]


class Record(Protocol):
    """A source record (aiokafka's ``ConsumerRecord`` is one)."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def timestamp(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def headers(self) -> Headers: ...


class Table(Protocol):
    """A table as a stage uses it (:class:`pipeline.eos.faust.store.TransactionalStore`)."""

    def read(self, tp: TP, key: bytes) -> bytes | None: ...

    def stage(self, tp: TP, key: bytes, value: bytes | None) -> None: ...


class Out:
    """The effects of the record being handled: table reads and writes in the open
    transaction of its source partition, and outputs, in the order they are made."""

    __slots__ = ("offset", "sends", "tp")

    def __init__(self, tp: TP) -> None:
        self.tp = tp
        #: the offset of the record being handled (what a failed output blames)
        self.offset = -1
        self.sends: list[OutRecord] = []

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self.sends.append(OutRecord(topic, key, value, None, timestamp_ms, headers, self.offset))

    def get(self, table: Table, key: bytes) -> bytes | None:
        return table.read(self.tp, key)

    def put(self, table: Table, key: bytes, value: bytes | None) -> None:
        """Write ``key`` (``None``: delete it)."""
        table.stage(self.tp, key, value)


Handle = Callable[[Any, Out], None]
DeadLetter = Callable[[Any, str, Out], None]


@dataclass(frozen=True, slots=True)
class Stage:
    """A stage of the chain: its name, its source topic, and what it does per record."""

    name: str
    topic: str
    handle: Handle
    dead_letter: DeadLetter
