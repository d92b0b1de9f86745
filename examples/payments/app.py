"""Payment notifications, exactly once: each provider notice counted once, routed to
``payments.settled`` or ``payments.failed``, with a running total per merchant.

Run: ``faust -A examples.payments.app worker -l info`` (README, "Your own pipeline").
"""

import json
from datetime import timedelta
from typing import Any, NamedTuple

from pipeline.api import JSON, Dedup, Emit, Invalid, Pipeline


class Notice(NamedTuple):
    provider_id: str
    merchant: str
    amount_cents: int
    status: str


def parse(value: bytes) -> Notice | Invalid:
    try:
        doc = json.loads(value)
        notice = Notice(doc["provider_id"], doc["merchant"], doc["amount_cents"], doc["status"])
    except (ValueError, KeyError, TypeError) as exc:
        return Invalid(f"not a payment notice: {exc!r}")
    ok = notice.status in ("settled", "failed") and type(notice.amount_cents) is int
    if not ok or not all(isinstance(s, str) and s for s in notice[:2]):
        return Invalid(f"not a payment notice: {doc!r:.200}")
    return notice


pipe = Pipeline("payments")


@pipe.stage(
    "notices",
    source="payments.raw",
    parse=parse,
    outputs=["payments.settled", "payments.failed"],
    dedup=Dedup(key=lambda n: n.provider_id.encode(), window=timedelta(days=1)),
    partition_by=lambda n: n.merchant.encode(),
    key=lambda n: n.merchant.encode(),
    state=JSON,
)
def settle(total: Any, n: Notice) -> tuple[Any, list[Emit]]:
    total = total or {"settled_cents": 0, "settled": 0, "failed": 0}
    if n.status == "settled":
        total = {**total, "settled_cents": total["settled_cents"] + n.amount_cents}
    total = {**total, n.status: total[n.status] + 1}
    body = json.dumps({**n._asdict(), "merchant_total_cents": total["settled_cents"]})
    return total, [Emit(f"payments.{n.status}", n.merchant.encode(), body.encode())]


app = pipe.app
