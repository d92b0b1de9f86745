"""``python -m pipeline COMMAND``: the pipeline's tools."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import orjson

from pipeline.settings import Settings


def _produce(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.admin import declare_topics
    from pipeline.kafka_io import produce
    from pipeline.tools.generate import generate

    if args.via_outbox:
        from pipeline.tools.shop import produce_via_outbox

        if not args.db:
            print("produce --via-outbox needs --db URL", file=sys.stderr)
            return 2
        return produce_via_outbox(args, settings)

    async def run() -> int:
        await declare_topics(settings, [settings.topic_raw])
        records = generate(
            args.count,
            seed=args.seed,
            dup_rate=args.dup_rate,
            bad_rate=args.bad_rate,
            illegal_rate=args.illegal_rate,
            prefix=args.prefix,
        )
        return await produce(settings.kafka, settings.topic_raw, records, rate=args.rate)

    n = asyncio.run(run())
    print(f"produced {n} records to {settings.topic_raw} at {settings.broker}")
    return 0


def _declared(target: str) -> Any:
    from pipeline.api import load

    return load(target)


def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.tools.reconcile import reconcile

    if args.follow:
        from pipeline.tools.reconcile_follow import main as follow_main

        return follow_main(args, settings)
    if args.state or args.rounds is not None:
        print("reconcile --state and --rounds go with --follow", file=sys.stderr)
        return 2
    if args.db_only and not args.db:
        print("reconcile --db-only needs --db URL", file=sys.stderr)
        return 2
    if args.db and args.pipeline:
        # The sink's and the outbox's tables are the order pipeline's.
        print("reconcile --db checks the order pipeline; it takes no --pipeline", file=sys.stderr)
        return 2
    report = None
    if args.pipeline:
        from pipeline.tools.reconcile_api import reconcile_pipeline

        report = asyncio.run(reconcile_pipeline(_declared(args.pipeline)))
    elif not args.db_only:
        report = asyncio.run(reconcile(settings, progress=sys.stderr.isatty()))
    db_report = None
    if args.db:
        from sqlalchemy.exc import ArgumentError, SQLAlchemyError

        from pipeline.edges.db import describe_error
        from pipeline.tools.reconcile_db import NoTables, reconcile_db

        try:
            db_report = asyncio.run(reconcile_db(settings, args.db, show=args.db_show))
        except (SQLAlchemyError, ArgumentError) as exc:
            # Unreachable, refused, no such table: one line, no verdict (2, not 1: the
            # database was not compared, so nothing was found to differ).
            print(
                f"reconcile --db: cannot read the database: {describe_error(exc)}", file=sys.stderr
            )
            return 2
        except NoTables as exc:
            print(f"reconcile --db: {exc}", file=sys.stderr)
            return 2
    if args.metrics_file:
        from pipeline.tools.reconcile import write_metrics

        if report is not None:
            write_metrics(report, args.metrics_file)
        if db_report is not None:
            from pipeline.tools.reconcile_db import write_db_metrics

            # After the Kafka gauges, into the same file: one textfile per reconcile.
            write_db_metrics(db_report, args.metrics_file, append=report is not None)
    ok = (report is None or report.ok) and (db_report is None or db_report.ok)
    if args.json:
        doc: dict[str, Any] = report.as_dict() if report is not None else {}
        if db_report is not None:
            doc["db"] = db_report.as_dict()
            # The top-level verdict is the whole command's (its exit status).
            doc["verdict"] = "PASS" if ok else "FAIL"
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        if report is not None:
            print(report.render())
        if db_report is not None:
            print(db_report.render())
        if report is not None and db_report is not None:
            print(
                f"verdict: {'PASS' if ok else 'FAIL'} (Kafka {'PASS' if report.ok else 'FAIL'},"
                f" database {'PASS' if db_report.ok else 'FAIL'})"
            )
    return 0 if ok else 1


def _status(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from pipeline.tools.procs import drained, drained_topics

    if args.pipeline:
        pipe = _declared(args.pipeline)
        settings = pipe.settings
        topics = []
        for info in pipe.stages.values():
            topics += [info.source, info.processed_from]
        topics = list(dict.fromkeys(topics))
        names = ", ".join(topics)
    else:
        names = (
            f"{settings.topic_raw} -> {settings.by_order_topic} -> {settings.topic_unique} -> "
            f"{settings.deltas_topic}"
        )
    deadline = time.monotonic() + (args.wait or 0)
    while True:
        if args.pipeline:
            done, total = asyncio.run(drained_topics(settings, topics))
        else:
            done, total = asyncio.run(drained(settings))
        if not args.wait or done >= total or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(
        f"{names}: "
        f"{done} of {total} records committed by group {settings.app_id} (lag {total - done})"
    )
    return 0 if done >= total else 1


def _topics(args: argparse.Namespace, settings: Settings) -> int:
    """Create the topics a pipeline reads and writes that do not exist yet, with their
    configuration: for an operator's principal, on a cluster whose ACLs let the workers
    create only their internal topics (README, "Secured cluster")."""
    from pipeline.admin import declare_topics, ensure_topics

    if args.pipeline:
        pipe = _declared(args.pipeline)
        s = pipe.settings
        wanted = dict(pipe.app.topic_overrides)

        async def run() -> None:
            for name, config in wanted.items():
                await ensure_topics(s.kafka, [name], s.partitions, s.replication, config=config)

        names = list(wanted)
    else:
        from pipeline.admin import topic_configs

        names = list(topic_configs(settings))

        async def run() -> None:
            await declare_topics(settings)

    asyncio.run(run())
    print(f"topics present: {', '.join(names)}")
    return 0


def _partition_counts(text: str) -> list[int]:
    """``8`` or ``8,64``: one partition count, or several run side by side."""
    counts = []
    for part in text.split(","):
        try:
            n = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a partition count: {part!r}") from None
        # Kafka allows more, but one worker owning more than this many transactional
        # producers (one per source partition) is not a benchmark of anything we ship.
        if not 1 <= n <= 1024:
            raise argparse.ArgumentTypeError(f"partitions must be 1..1024, not {n}")
        if n in counts:
            raise argparse.ArgumentTypeError(f"partition count {n} given twice")
        counts.append(n)
    return counts


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.tools.bench import main as bench_main

    return bench_main(args, settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("produce", help="send demo or load events to orders.raw")
    p.add_argument("--count", type=int, default=10_000, help="records to send (default 10000)")
    p.add_argument("--dup-rate", type=float, default=0.3, help="share of re-sent copies (0.3)")
    p.add_argument("--bad-rate", type=float, default=0.01, help="share of bad records (0.01)")
    p.add_argument(
        "--illegal-rate",
        type=float,
        default=0.05,
        help="share of orders with an illegal or out-of-order event (0.05)",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed (1)")
    p.add_argument("--rate", type=float, default=None, help="records per second (unlimited)")
    p.add_argument("--prefix", default="o", help="order id prefix, to keep runs apart")
    p.add_argument(
        "--via-outbox",
        action="store_true",
        help="act as an application: --count orders, each step one database transaction"
        " (business row + outbox row); publish them with outbox-relay",
    )
    p.add_argument("--db", default=None, help="with --via-outbox: SQLAlchemy URL or SQLite path")
    p.set_defaults(func=_produce)

    p = sub.add_parser("reconcile", help="prove exactly-once between input and outputs")
    p.add_argument(
        "--pipeline",
        default=None,
        metavar="MODULE[:NAME]",
        help="a pipeline declared with pipeline.api (its Pipeline object, 'pipe' by default)"
        " instead of the order pipeline, e.g. examples.payments.app",
    )
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument(
        "--metrics-file",
        default=None,
        help="also write the verdict as Prometheus text here (node_exporter textfile"
        " collector; see deploy/alerts.yml)",
    )
    p.add_argument(
        "--db",
        default=None,
        metavar="URL",
        help="then also compare this database with the Kafka outputs: the sink's orders and"
        " coupons tables (up to the offsets the sink stored; the rest is lag) and the"
        " outbox's published rows with orders.raw (SQLAlchemy URL or SQLite path)",
    )
    p.add_argument(
        "--db-only",
        action="store_true",
        help="with --db: only the database checks, not the Kafka ones",
    )
    p.add_argument(
        "--db-show",
        type=int,
        default=20,
        metavar="N",
        help="differences listed per table (20; 0: all); all are counted",
    )
    p.add_argument(
        "--follow",
        action="store_true",
        help="run beside a deployment: check what was appended since the last round, every"
        " --interval seconds, with its progress checkpointed in --state",
    )
    p.add_argument(
        "--interval", type=float, default=30.0, help="with --follow: seconds between rounds (30)"
    )
    p.add_argument(
        "--state",
        default=None,
        metavar="DIR",
        help="with --follow: where its state and checkpoint live"
        " (default .reconcile-follow/<app id>)",
    )
    p.add_argument(
        "--rounds", type=int, default=None, metavar="N", help="with --follow: stop after N rounds"
    )
    p.add_argument(
        "--round-records",
        type=int,
        default=50_000,
        metavar="N",
        help="with --follow: records read per topic in one round at most, which bounds its"
        " memory (50000: about 0.5 KB each)",
    )
    p.set_defaults(func=_reconcile)

    p = sub.add_parser(
        "topics", help="create the topics a pipeline reads and writes (an operator's step)"
    )
    p.add_argument(
        "--pipeline",
        metavar="MODULE[:NAME]",
        help="the topics of a pipeline of pipeline.api (default: the order pipeline's)",
    )
    p.set_defaults(func=_topics)

    p = sub.add_parser("status", help="input records committed by the worker group, and lag")
    p.add_argument(
        "--pipeline",
        default=None,
        metavar="MODULE[:NAME]",
        help="a pipeline declared with pipeline.api instead of the order pipeline",
    )
    p.add_argument("--wait", type=float, default=0, help="wait up to this many seconds for lag 0")
    p.set_defaults(func=_status)

    p = sub.add_parser(
        "bench",
        help="exactly_once against at_least_once, the raw aiokafka loop, Quix and Kafka's"
        " perf tools: throughput, latency, CPU, RSS (docs/benchmarks.md)",
    )
    p.add_argument(
        "--count", type=int, default=200_000, help="events per run (200000; --quick: 5000)"
    )
    p.add_argument("--quick", action="store_true", help="a short run (5000 events, 1 run)")
    p.add_argument("--runs", type=int, default=3, help="runs per system; median reported (3)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated systems to run (default all): raw, dedup-alo, dedup-eos,"
        " full-alo, full-eos, quix, kafka",
    )
    p.add_argument(
        "--db",
        default=None,
        help="also measure the outbox relay and the sink on this database (SQLAlchemy URL;"
        " default $PIPELINE_BENCH_DB)",
    )
    p.add_argument(
        "--partitions",
        type=_partition_counts,
        default=[8],
        help="partitions of every topic of the workload (8); several, comma-separated "
        "(8,64), run every system at each count in the same invocation, with ratios",
    )
    from pipeline.tools.bench_recovery import add_arguments as recovery_arguments

    recovery_arguments(p)
    p.set_defaults(func=_bench)

    from pipeline.tools import chaos

    chaos.add_parser(sub)
    from pipeline.edges import outbox, sink

    sink.add_parser(sub)
    outbox.add_parser(sub)

    return parser


def _uses_kafka(args: argparse.Namespace) -> bool:
    """Every command talks to Kafka but ``produce --via-outbox`` (the database only)."""
    return not (args.command == "produce" and getattr(args, "via_outbox", False))


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from pipeline.connection import EXIT_KAFKA_ACCESS, KafkaAccessError, run_preflight

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        # One line per problem; pydantic's input is hidden (hide_input_in_errors), so a
        # refused password or token never reaches the terminal.
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            field = f"PIPELINE_{where.upper()}: " if where else ""
            message = str(error["msg"]).removeprefix("Value error, ")
            print(f"settings: {field}{message}", file=sys.stderr)
        return EXIT_KAFKA_ACCESS
    if _uses_kafka(args):
        # The preflight: refused credentials or TLS end the command here, with one line
        # and status 78, before any client retries them (pipeline/connection.py).
        try:
            run_preflight(settings.kafka)
        except KafkaAccessError as exc:
            print(exc.line, file=sys.stderr)
            return EXIT_KAFKA_ACCESS
    result: int = args.func(args, settings)
    return result


if __name__ == "__main__":
    sys.exit(main())
