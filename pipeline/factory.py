"""The app factory: maps :class:`~pipeline.settings.Settings` into ``faust.App`` explicitly."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, NoReturn

from mode.utils.times import want_seconds
from prometheus_client import Histogram

from pipeline.admin import EXIT_CONFIG, LARGE_MESSAGE_BYTES, TopicsRefused
from pipeline.eos import Coordinator
from pipeline.eos.faust.app import EngineApp
from pipeline.eos.faust.store import EosTable
from pipeline.settings import Settings
from pipeline.stats import Stats

log = logging.getLogger(__name__)

#: Faust settings that Faust would read from the environment. We pass ``env={}`` so
#: none of them applies; a worker that has one set says so, instead of silently
#: running with a different broker or port than PIPELINE_* says.
#: Of Kafka security, Faust reads only ``BROKER_CREDENTIALS`` (and ``BROKER_URL``'s
#: scheme): both ignored here, the credentials come from PIPELINE_KAFKA_* (create_app
#: passes ``broker_credentials``). What does matter besides PIPELINE_KAFKA_*: OpenSSL's
#: ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``, the CA store used when
#: PIPELINE_KAFKA_SSL_CAFILE is unset. Faust's import-time ``F_*``/``FAUST_*``
#: variables (``faust.types._env``) hold no Kafka setting.
_FAUST_ENV = (
    "BROKER_URL",
    "BROKER_CREDENTIALS",
    "WEB_PORT",
    "WEB_BIND",
    "APP_DATADIR",
    "F_DATADIR",
    "BROKER_COMMIT_INTERVAL",
)


#: At most this many records per poll: two stage queues' worth
#: (``pipeline.eos.coordinator.QUEUE_HIGH``). Measured on a 200,000-event backlog
#: (docs/benchmarks.md, "Records per poll"): peak RSS of the dedup stage's worker
#: 184-185 -> 136-137 MB, of the full chain's 248-257 -> 185-189 MB, CPU per event
#: unchanged; at 2,000 the memory was the same and the CPU per event 10-20% higher.
#: The fetch size stays Faust's 1 MB per partition: at 256 kB the dedup stage lost a
#: third of its events/s.
MAX_POLL_RECORDS = 4_000

#: The consumer's metadata refresh interval (see create_app).
METADATA_MAX_AGE_MS = 10_000


class PipelineApp(EngineApp):
    """``faust.App`` with our exactly-once engine (:class:`EngineApp`) and topic bootstrap."""

    settings: Settings
    stats: Stats

    def on_rebalance_start(self) -> None:
        super().on_rebalance_start()
        self.rebalance_started = time.monotonic()
        self.eos.unsettle()

    def on_rebalance_end(self) -> None:
        # Faust calls this only when the recovery of the current assignment completed:
        # stream partitions seeked to their committed offsets (read after our producers'
        # InitProducerId, so they are stable), tables restored (in exactly-once mode,
        # the coordinator restores them next). That, not any seek, is when processing
        # may start; see Coordinator.recovered.
        super().on_rebalance_end()
        if self.settings.exactly_once:
            self.eos.on_settled = self._observe_recovery
            # Which assignment this recovery was for (see Coordinator.recovered).
            generation, restarting = self.ended_recovery()
            self.eos.recovered(generation=generation, restarting=restarting)
        else:
            self._observe_recovery()

    @property
    def recovering(self) -> bool:
        """Whether this worker's state may be behind its changelogs: Faust is
        rebalancing, or (exactly-once) Faust's recovery ended and the coordinator is
        still restoring the tables and settling (pipeline.eos.restore), which Faust's
        ``rebalancing`` no longer shows. /stats, /metrics and the stale header of the
        views all say this."""
        return bool(self.rebalancing) or (self.settings.exactly_once and not self.eos.settled)

    def _observe_recovery(self) -> None:
        if self.rebalance_started is not None:
            # From the start of the rebalance to the end of the tables' recovery.
            self.recoveries.observe(time.monotonic() - self.rebalance_started)
            self.rebalance_started = None

    def on_webserver_init(self, web: Any) -> None:
        # Faust's hook for its web server (the aiohttp driver's application, before it
        # serves): the bearer token, when set, guards every route (pipeline.web).
        super().on_webserver_init(web)
        from pipeline.web import token_guard

        guard = token_guard(self.settings)
        if guard is not None:
            web.web_app.middlewares.append(guard)

    async def on_first_start(self) -> None:
        # Before any Kafka client of this worker starts (Faust starts its consumer and
        # producer after this method), connect as they will: refused credentials or TLS
        # end the worker here with one line, instead of aiokafka's "Unable to bootstrap"
        # retried without end.
        await self._refuse_kafka_access()
        # Source and output topics are declared here, before the consumer subscribes,
        # with the partition count of the settings (Faust declares only internal ones).
        try:
            await self._declare_topics()
        except TopicsRefused as exc:
            # A user without the Create right (a secured cluster): no retry helps.
            _refuse([str(exc)], EXIT_CONFIG)
        await self._refuse_unsafe_topics()
        await super().on_first_start()

    async def _declare_topics(self) -> None:
        from pipeline.admin import declare_topics, ensure_topics

        s = self.settings
        kafka = s.kafka
        declared = [t.get_topic_name() for t in self.declared_topics]
        await declare_topics(s, [n for n in declared if n not in self.topic_overrides])
        for name, config in self.topic_overrides.items():
            await ensure_topics(kafka, [name], s.partitions, s.replication, config=config)
        await declare_topics(s, [s.progress_topic])
        # The tables' changelogs too, with the configuration Faust would give them.
        # Faust creates them itself only as the consumer subscribes, and on a new app the
        # group's first assignment was then computed from metadata that did not list
        # them yet: a changelog missing from the assignment is neither recovered nor
        # kept as a standby, and a partition that later moved to another worker was
        # processed there against an empty table (seen in a chaos run: balances lost).
        for table in self.tables.values():
            topic = table.changelog_topic
            await ensure_topics(
                kafka,
                [topic.get_topic_name()],
                table.partitions or s.partitions,
                s.replication,
                config=_topic_config(topic),
            )

    async def _refuse_kafka_access(self) -> None:
        """Exit (status 78) with one line when the broker refuses this worker's
        credentials or TLS setup (:func:`pipeline.connection.check_connection`)."""
        from pipeline.connection import EXIT_KAFKA_ACCESS, KafkaAccessError, preflight

        try:
            await preflight(self.settings.kafka)
        except KafkaAccessError as exc:
            _refuse([exc.line], EXIT_KAFKA_ACCESS)

    async def _refuse_unsafe_topics(self) -> None:
        """Refuse to start, with one line per cause, on topics the pipeline cannot keep
        exactly-once on (see :func:`pipeline.admin.topic_problems`): a worker that
        restarted into the same problem would only crash-loop."""
        from pipeline.admin import topic_problems

        changelogs = [t.changelog_topic.get_topic_name() for t in self.tables.values()]
        problems = await topic_problems(
            self.settings,
            changelogs,
            keyed=self.keyed_topics,
            append_time=self.append_time_topics,
            orders=self.order_topics,
        )
        if problems:
            _refuse(problems, EXIT_CONFIG)

    declared_topics: list[Any]
    #: topics declared with a configuration of their own (pipeline.api), by name
    topic_overrides: dict[str, dict[str, str]]
    #: more topics that must have the configured partition count (a table's state is
    #: partitioned like them), and topics whose records must carry the broker's append
    #: time (a dedup window runs on it); pipeline.api adds its stages' here
    keyed_topics: list[str]
    append_time_topics: list[str]
    #: whether the app runs the order pipeline (its topics are checked at start)
    order_topics: bool
    rebalance_started: float | None
    recoveries: Histogram


def _refuse(lines: list[str], status: int) -> NoReturn:
    """End a worker that must not start, one log line per cause: a restart into the same
    configuration would only crash-loop, so no exception for Faust to log and retry."""
    for line in lines:
        log.critical("refusing to start: %s", line)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(status)


def _topic_config(topic: Any) -> dict[str, str]:
    """The broker configuration Faust's own declaration gives a topic."""
    config = {str(k): str(v) for k, v in (topic.config or {}).items()}
    policies = [p for on, p in ((topic.compacting, "compact"), (topic.deleting, "delete")) if on]
    if policies:
        config["cleanup.policy"] = ",".join(policies)
    if topic.retention:
        config["retention.ms"] = str(int(want_seconds(topic.retention) * 1000))
    return config


def create_app(settings: Settings) -> PipelineApp:
    for name in _FAUST_ENV:
        if name in os.environ:
            log.warning("%s is set but ignored: configure the pipeline with PIPELINE_*", name)
    settings.datadir.mkdir(parents=True, exist_ok=True)
    app = PipelineApp(
        settings.app_id,
        env={},
        autodiscover=False,
        broker=settings.broker,
        # TLS and SASL of every client Faust makes: its consumer, its producer, its
        # topic creation, and our transactional producers, which take the producer's
        # settings (pipeline/eos/faust/producer.py, ``_settings_auth()``).
        broker_credentials=settings.kafka.faust_credentials(),
        datadir=str(settings.datadir),
        processing_guarantee=settings.processing_guarantee.value,
        store="rocksdb://",
        Table=EosTable,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication,
        table_standby_replicas=1,
        broker_commit_interval=settings.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        web_port=settings.web_port,
        # Faust's web_host is the advertised address (its canonical URL, which other
        # workers' table_route views send requests to); web_bind is what it listens on.
        web_bind=settings.web_host,
        web_host=settings.advertised_web_host,
        # Faust's own /router and /table pages (on by default in Faust): off unless
        # asked for (PIPELINE_WEB_FAUST_PAGES).
        web_router_enabled=settings.web_faust_pages,
        web_tables_enabled=settings.web_faust_pages,
        # A worker killed with -9 must lose its partitions within seconds, not 60.
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=1.0,
        producer_acks=-1,
        producer_linger=0.005,
        # Our transactional producers take it too (``_settings_default()``); see the
        # setting for why not Faust's 20 minutes.
        producer_request_timeout=settings.producer_request_timeout_s,
        # Faust's default (1,000,000 bytes) refused valid events of up to 1 MiB.
        producer_max_request_size=LARGE_MESSAGE_BYTES,
        # Records one poll of the consumer hands out. Faust's default (no limit) handed
        # out everything fetched: up to 1 MB per partition, so tens of thousands of
        # records parsed into Python objects at once on a backlog, most of them
        # waiting for a stage's queue. See MAX_POLL_RECORDS.
        broker_max_poll_records=MAX_POLL_RECORDS,
        # How stale the consumer's view of the topics may grow. aiokafka's default, 5
        # minutes, is how long a group stayed assigned nothing in a test: a worker that
        # started while the broker restarted led the group with metadata that lacked the
        # topics ("Ignoring missing topic"), and the group rebalanced onto them only at
        # the next refresh. One metadata request per 10 s per worker is cheap.
        consumer_metadata_max_age_ms=METADATA_MAX_AGE_MS,
    )
    app.settings = settings
    app.eos = Coordinator(settings)
    app.stats = Stats()
    app.rebalance_started = None
    app.recoveries = Histogram(
        "pipeline_recovery_seconds",
        "From a rebalance's start to the end of its table recovery (restore)",
        buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
        registry=None,
    )
    app.declared_topics = []
    app.topic_overrides = {}
    app.keyed_topics = []
    app.append_time_topics = []
    app.order_topics = True
    return app
