"""The route stage's decision (pure): validate a record of ``orders.raw`` and say where
it goes, on to the partition of its order or to the dead-letter topic. Why a hop of its
own: :mod:`pipeline.agents.route`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from pipeline.domain.codecs import dlq_value
from pipeline.domain.models import BadInput, parse_event

#: header names on the rekeyed topic and on ``orders.unique``
SRC = "pipeline.src"
EID = "pipeline.eid"


class Rekey(NamedTuple):
    """A valid event: on to the partition of its order. (A named tuple: one per record,
    and a frozen dataclass's ``__init__`` costs a ``setattr`` call per field.)"""

    order_key: bytes
    event_id: bytes


@dataclass(frozen=True, slots=True)
class DeadLetter:
    value: bytes


def route_record(
    value: bytes | None, key: bytes | None, where: tuple[str, int, int]
) -> Rekey | DeadLetter:
    """The whole per-record decision of the route stage (pure)."""
    parsed = parse_event(value, key)
    if isinstance(parsed, BadInput):
        topic, partition, offset = where
        return DeadLetter(dlq_value(parsed.reason, topic, partition, offset, value))
    return Rekey(parsed.order_id.encode(), parsed.event_id.encode())


def source_header(partition: int, offset: int) -> bytes:
    return f"{partition}:{offset}".encode()
