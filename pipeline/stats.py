"""Per-process counters behind ``/stats`` and ``/metrics``.

These count what this worker process did since it started, like Prometheus counters:
after a crash, re-processed events are counted again by the worker that re-processes
them. The exactly-once facts live in the topics and are proven by ``reconcile``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


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

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
