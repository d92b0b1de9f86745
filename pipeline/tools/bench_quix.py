"""The peer for ``bench``: the same dedup decision on Quix Streams, exactly-once.

``python -m pipeline.tools.bench_quix --input T --unique T --dlq T --group G --state-dir D``
needs the optional ``bench`` extra (``quixstreams``); the runner may start it with
another interpreter (``PIPELINE_BENCH_QUIX_PYTHON``) so the peer's dependencies stay out
of the pipeline's environment.

State is Quix's RocksDB store with changelog topics; ``processing_guarantee`` is
``exactly-once`` and the commit interval is the runner's, so both systems pay for the
same number of transactions. Quix scopes state by message key; our input is keyed by
``order_id`` and every copy of an event carries the same key, so per-key state reaches
the same verdicts as the dedup agent's per-partition table. Outputs keep the input key
(equal to ``order_id`` for every valid record, as the contract requires).

Prints ``{"first": <monotonic>, "cpu": <process CPU s>}`` on the first record, like
``pipeline.tools.bench_raw``, and runs until SIGTERM. It connects to ``--bootstrap`` with
the librdkafka security settings (TLS, SASL) the runner puts in the environment as JSON,
``PIPELINE_BENCH_KAFKA_CONFIG`` (``KafkaConnection.librdkafka_config``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import orjson

from pipeline.domain.dedup import DeadLetter, Forward, decide_record, encode_seen

WINDOW_MS = 7 * 24 * 3600 * 1000


def main(argv: list[str] | None = None) -> int:
    from quixstreams import Application
    from quixstreams.context import message_context

    p = argparse.ArgumentParser(prog="python -m pipeline.tools.bench_quix", description=__doc__)
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    p.add_argument("--input", required=True)
    p.add_argument("--unique", required=True)
    p.add_argument("--dlq", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--commit-ms", type=int, default=100)
    args = p.parse_args(argv)
    broker: Any = args.bootstrap
    security = json.loads(os.environ.get("PIPELINE_BENCH_KAFKA_CONFIG") or "{}")
    if security:
        from quixstreams.kafka.configuration import ConnectionConfig

        broker = ConnectionConfig.from_librdkafka_dict(
            {"bootstrap.servers": args.bootstrap, **security}
        )

    app = Application(
        broker_address=broker,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        commit_interval=args.commit_ms / 1000,
        state_dir=args.state_dir,
        loglevel="WARNING",
        # Same producer batching as our chain's bench producer side (linger 5 ms).
        producer_extra_config={"linger.ms": 5},
    )
    source = app.topic(args.input, key_deserializer="bytes", value_deserializer="bytes")
    unique = app.topic(args.unique, key_serializer="bytes", value_serializer="bytes")
    dlq = app.topic(args.dlq, key_serializer="bytes", value_serializer="bytes")
    started = [False]

    def decide(value: Any, key: Any, timestamp: int, headers: Any, state: Any) -> Any:
        if not started[0]:
            started[0] = True
            line = {"first": time.monotonic(), "cpu": time.process_time()}
            print(orjson.dumps(line).decode(), flush=True)
        ctx = message_context()

        # Quix's state serialises keys and values as JSON: ids as text, first-seen as int.
        def lookup(event_id: bytes) -> bytes | None:
            first = state.get(event_id.decode())
            return None if first is None else encode_seen(first)

        action = decide_record(
            value, key, timestamp, (ctx.topic, ctx.partition, ctx.offset), lookup, WINDOW_MS
        )
        if isinstance(action, Forward):
            state.set(action.event_id.decode(), action.first_ms)
            return (0, value)
        if isinstance(action, DeadLetter):
            return (1, action.value)
        return None

    sdf = app.dataframe(source).apply(decide, stateful=True, metadata=True)
    sdf.filter(lambda d: d is not None and d[0] == 0).apply(lambda d: d[1]).to_topic(unique)
    sdf.filter(lambda d: d is not None and d[0] == 1).apply(lambda d: d[1]).to_topic(dlq)
    app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
