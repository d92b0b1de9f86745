"""Per-process counters behind ``/stats`` and ``/metrics``.

These count what this worker process did since it started, like Prometheus counters:
after a crash, re-processed events are counted again by the worker that re-processes
them. The exactly-once facts live in the topics and are proven by ``reconcile``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields


@dataclass
class Stats:
    seen: int = 0
    unique: int = 0
    duplicates_dropped: int = 0
    dlq: int = 0
    rejected: int = 0
    changes: int = 0
    coupons: int = 0
    expired_ids: int = 0
    #: records sent per output topic by the stages of :mod:`pipeline.api`
    outputs: Counter[str] = field(default_factory=Counter)
    #: counters that are the records sent to one output topic (counter -> topic): the
    #: order pipeline's ``changes``, ``rejected`` and ``coupons``
    counted_as: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        counts = {
            f.name: value for f in fields(self) if isinstance(value := getattr(self, f.name), int)
        }
        for name, topic in self.counted_as.items():
            counts[name] = self.outputs[topic]
        return counts
