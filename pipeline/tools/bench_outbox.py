"""``python -m pipeline.tools.bench_outbox --db URL``: outbox relay rows/s and sink rows/s.

Both measured in this process against the given database and the broker, on topics of
their own (a uuid prefix), each from a standing start:

* relay: ``--rows`` outbox rows (orders.raw events, 1,000 keys) are written first, then one
  relay publishes them all; the clock runs from its start to the last mark;
* sink: the same number of ``orders.changes`` records (versions 1..3 per order) are
  produced first, then the sink writes them all; the clock runs until it has stored the
  last offset.

Not yet part of ``python -m pipeline bench`` (whose runner lives in ``pipeline/tools/bench.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid

import orjson
from sqlalchemy import func, insert, select

from pipeline.admin import declare_topics
from pipeline.connection import require_access
from pipeline.edges import db
from pipeline.edges.outbox import Relay, bucket_of
from pipeline.edges.sink import run_sink
from pipeline.kafka_io import produce
from pipeline.settings import Settings
from pipeline.tools.generate import Record


async def bench(db_url: str, rows: int, settings: Settings) -> dict[str, float]:
    tag = f"bench-{uuid.uuid4().hex[:8]}"
    s = settings.model_copy(
        update={
            "topic_raw": f"{tag}.orders.raw",
            "topic_changes": f"{tag}.orders.changes",
            "topic_coupons": f"{tag}.coupons.issued",
        }
    )
    engine = db.engine_for(db_url)
    db.create_schema(engine)
    await declare_topics(s, [s.topic_raw, s.topic_changes, s.topic_coupons])
    now = db.now_ms()
    values = []
    for n in range(rows):
        oid = f"{tag}-o{n % 1000}"
        eid = f"{tag}-e{n}"
        doc = {"event_id": eid, "type": "OrderShipped", "order_id": oid, "ts_ms": now}
        values.append(
            {
                "event_id": eid,
                "topic": s.topic_raw,
                "key": oid.encode(),
                "value": orjson.dumps(doc),
                "bucket": bucket_of(oid.encode(), eid),
                "created_ms": now,
            }
        )
    with engine.begin() as conn:
        for i in range(0, rows, 5000):
            conn.execute(insert(db.outbox), values[i : i + 5000])
    relay = Relay(s, db_url, batch=1000)
    started = time.monotonic()
    stats = await relay.run(asyncio.Event(), idle_exit_s=1.0)
    relay_s = time.monotonic() - started - 1.0
    assert stats.published == rows, stats

    statuses = [("NEW", "CREATED"), ("CREATED", "PAID"), ("PAID", "SHIPPED")]
    changes = []
    for n in range(rows):
        oid, v = f"{tag}-s{n // 3}", n % 3 + 1
        frm, to = statuses[v - 1]
        doc = {"event_id": f"{oid}-{v}", "order_id": oid, "from": frm, "to": to,
               "version": v, "ts_ms": now}  # fmt: skip
        changes.append(Record(oid.encode(), orjson.dumps(doc), "new"))
    kafka = s.kafka
    await produce(kafka, s.topic_changes, changes)
    await produce(
        kafka,
        s.topic_coupons,
        [
            Record(
                b"x",
                orjson.dumps(
                    {"coupon_id": "c", "order_id": "x", "user_id": "u", "amount_cents": 1}
                ),
                "new",
            )
        ],
    )
    started = time.monotonic()
    sink_stats = await run_sink(s, db_url, idle_exit_s=1.0)
    sink_s = time.monotonic() - started - 1.0
    with engine.connect() as conn:
        stored = conn.execute(
            select(func.count())
            .select_from(db.sink_orders)
            .where(db.sink_orders.c.order_id.like(f"{tag}-%"))
        ).scalar_one()
    engine.dispose()
    assert sink_stats.records == rows + 1 and stored == (rows + 2) // 3, (sink_stats, stored)
    return {
        "rows": rows,
        "relay_rows_per_s": round(rows / relay_s, 1),
        "sink_records_per_s": round(rows / sink_s, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tools.bench_outbox", description=__doc__
    )
    parser.add_argument("--db", required=True, help="SQLAlchemy URL or SQLite file path")
    parser.add_argument("--rows", type=int, default=20_000, help="rows per measurement (20000)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings()
    require_access(settings.kafka)
    result = asyncio.run(bench(args.db, args.rows, settings))
    print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
