"""The one settings object of the pipeline.

Every knob is a ``PIPELINE_*`` environment variable. :func:`pipeline.factory.create_app`
maps these fields into ``faust.App(...)`` explicitly and hides ``os.environ`` from Faust,
so Faust's own variables (``BROKER_URL``, ``WEB_PORT``, ``APP_DATADIR`` ...) cannot
silently override what an operator configured here.
"""

from __future__ import annotations

import os
import socket
import ssl
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.connection import SaslMechanism, SecurityProtocol, ssl_context_for

if TYPE_CHECKING:
    from pipeline.connection import KafkaConnection


class Guarantee(StrEnum):
    EXACTLY_ONCE = "exactly_once"
    AT_LEAST_ONCE = "at_least_once"


#: the shortest web token taken (``PIPELINE_WEB_TOKEN``, ``PIPELINE_METRICS_TOKEN``)
MIN_TOKEN_CHARS = 16

#: bind addresses that mean "every interface": never an address to reach a worker at
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})


class Settings(BaseSettings):
    # hide_input_in_errors: pydantic's message names the value it refused, and a
    # refused token (too short, say) is still a secret: it must not reach a log.
    model_config = SettingsConfigDict(
        env_prefix="PIPELINE_", frozen=True, extra="ignore", hide_input_in_errors=True
    )

    app_id: str = "orders-pipeline"
    #: Goes before the name of every topic a pipeline declared through
    #: :mod:`pipeline.api` (its sources, outputs and dead-letter topic), e.g. "staging.".
    topic_prefix: str = ""
    broker: str = "kafka://127.0.0.1:9092"
    # -- how every Kafka client connects (``settings.kafka``, pipeline/connection.py) --
    #: PLAINTEXT (no TLS, no SASL), SSL (TLS; with a client certificate: mutual TLS),
    #: SASL_PLAINTEXT, SASL_SSL.
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    #: The CA certificate(s) the brokers' certificates are checked against (PEM).
    #: Unset: the system's CA store (OpenSSL's, which honours SSL_CERT_FILE/SSL_CERT_DIR).
    kafka_ssl_cafile: Path | None = None
    #: Mutual TLS: this client's certificate and its private key (PEM), both or neither.
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    #: The password of an encrypted ``kafka_ssl_keyfile``.
    kafka_ssl_key_password: SecretStr | None = None
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    #: The SASL password, given as such or (better: it stays out of the environment of
    #: every process) read from ``PIPELINE_KAFKA_SASL_PASSWORD_FILE``, one trailing
    #: line break stripped; not both.
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None
    datadir: Path = Path("./data")
    processing_guarantee: Guarantee = Guarantee.EXACTLY_ONCE
    partitions: int = Field(default=8, ge=1, le=1024)
    replication: int = Field(default=1, ge=1)
    #: How long an ``event_id`` is remembered. A copy arriving later than this after the
    #: first one is treated as new; ids older than this leave the store and the changelog.
    dedup_window_s: float = Field(default=7 * 24 * 3600, gt=0)
    #: Extra time an expired id stays stored, for copies whose record timestamp is late.
    dedup_grace_s: float = Field(default=3600, ge=0)
    #: Under load, a partition's transaction commits this often (seconds): its length,
    #: and so the commit overhead per event and the latency under a backlog. At a trickle
    #: ``commit_quiet_s`` commits sooner. 0.25 measured 1.3 to 1.4 times the throughput of
    #: 0.1 here, at the same trickle latency (docs/benchmarks.md).
    commit_interval_s: float = Field(default=0.25, gt=0)
    #: Commit sooner, when the agents have had nothing to process for this long
    #: (seconds): at a trickle an event then waits one commit per hop, not the rest of
    #: the interval. Under a backlog they are never quiet, and the interval applies.
    #: 0 turns it off.
    commit_quiet_s: float = Field(default=0.005, ge=0)
    #: Upper bound on rows one sweep of the dedup window may look at (bounded work).
    expiry_batch: int = Field(default=500, ge=1)
    #: A partition's expired ids are swept after this many of its records.
    expiry_every: int = Field(default=1000, ge=1)
    #: A worker that stops heartbeating loses its partitions after this long (seconds).
    session_timeout_s: float = Field(default=10.0, ge=6.0)
    #: How long a producer request (a produce, a commit's EndTxn) may go unanswered
    #: before the connection is dropped and the request's outcome is treated as unknown
    #: (seconds). Faust's default, 1,200, let one connection whose answers were lost keep
    #: every partition of a worker from committing for as long (a chaos fault showed it);
    #: Kafka's own producers use 30. Below the transaction timeout (60 s), so the worker
    #: learns before the broker aborts the transaction.
    producer_request_timeout_s: float = Field(default=30.0, ge=5.0, le=55.0)
    web_port: int = 6066
    #: The address the web server binds to. Loopback by default: the views serve
    #: business data. ``0.0.0.0`` (every interface) is for a container.
    web_host: str = "127.0.0.1"
    #: The address other workers and clients reach this worker's views at: where a view
    #: asked for a key another worker owns sends the request (Faust's ``table_route``
    #: reads each worker's advertised URL). Default: ``web_host``, or this machine's host
    #: name when ``web_host`` is every interface, which no other machine can reach.
    web_advertised_host: str | None = None
    #: Serve Faust's own pages too: ``/router`` (which worker owns what) and ``/table``
    #: (any table's raw rows, for any key). Off: they bypass the views' validation
    #: and answer with business data nobody asked this app to publish.
    web_faust_pages: bool = False
    #: A bearer token every web route asks for (``Authorization: Bearer <token>``), but
    #: the dashboard page itself, which holds no data and asks for it. None: no token.
    web_token: SecretStr | None = None
    #: The token of ``/metrics`` alone, for Prometheus (default: ``web_token``).
    metrics_token: SecretStr | None = None
    #: Test-only: name of a commit step at which the worker calls ``os._exit``.
    crash_at: str | None = None
    #: Test-only: name of a commit step that fails (the transaction is aborted and an
    #: error raised), as when the broker times a transaction out.
    fail_at: str | None = None
    #: Test-only: name of a commit step that is slowed down by ``delay_s`` (as by a long
    #: pause of the event loop), at every commit the filters below let through.
    delay_at: str | None = None
    delay_s: float = Field(default=0.2, ge=0)
    #: Test-only: the faults above count (and fire at) only commits of this source
    #: topic's partitions ...
    fault_topic: str | None = None
    #: ... and only commits of transactions in which at least this many events were
    #: processed, so that a fault is certain to catch work in flight.
    fault_min_events: int = Field(default=0, ge=0)
    #: Test-only: crash (or fail) only after this many commits have passed the step.
    crash_after: int = 0
    #: Test-only: this many of the broker checks for an offset gap time out, as when the
    #: broker does not answer within 10 s.
    fail_checks: int = Field(default=0, ge=0)
    #: Test-only: processing a record of ``fail_event_topic`` whose value contains this
    #: text raises after the agent did its work (table writes and sends made), the first
    #: ``fail_event_times`` times (0: every time, a poison record).
    fail_event: str | None = None
    fail_event_topic: str | None = None
    fail_event_times: int = Field(default=1, ge=0)
    #: Test-only: comma-separated names of our fixes of stock Faust EOS to turn off
    #: (see ``pipeline/eos/__init__.py``), to show that each gap is real.
    disable_fix: str = ""
    #: Bench-only: "dedup" runs the dedup agent alone (no state machine, no balances), so
    #: ``bench`` can measure the first hop by itself. Default "all": the whole chain.
    stages: Literal["all", "dedup"] = "all"

    topic_raw: str = "orders.raw"
    topic_unique: str = "orders.unique"
    topic_dlq: str = "orders.dlq"
    topic_changes: str = "orders.changes"
    topic_rejected: str = "orders.rejected"
    topic_coupons: str = "coupons.issued"
    #: the repartition hop to per-user balances (internal); default "<app_id>-balance-deltas"
    topic_deltas: str | None = None
    #: the input rekeyed by order_id (internal); default "<app_id>-raw-by-order"
    topic_by_order: str | None = None

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator(
        "kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile", "kafka_sasl_password_file"
    )
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            _check_readable(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _password_file(cls, data: Any) -> Any:
        """Read ``kafka_sasl_password_file`` into ``kafka_sasl_password``."""
        if not isinstance(data, dict):
            return data
        given = data.get("kafka_sasl_password_file")
        if given is None or given == "":
            return data
        if data.get("kafka_sasl_password") not in (None, ""):
            raise ValueError(
                "set PIPELINE_KAFKA_SASL_PASSWORD or PIPELINE_KAFKA_SASL_PASSWORD_FILE, not both"
            )
        path = Path(given)
        _check_readable(path, "PIPELINE_KAFKA_SASL_PASSWORD_FILE=")
        text = path.read_text(encoding="utf-8")
        for end in ("\r\n", "\n"):
            if text.endswith(end):
                text = text[: -len(end)]
                break
        return {**data, "kafka_sasl_password": SecretStr(text)}

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        # Nothing set here is ever silently unused: a password with PLAINTEXT, say,
        # would mean a client that the operator believes authenticated but is not.
        protocol = self.kafka_security_protocol
        sasl = protocol in ("SASL_PLAINTEXT", "SASL_SSL")
        tls = protocol in ("SSL", "SASL_SSL")
        problems = []
        if sasl:
            if self.kafka_sasl_mechanism is None:
                problems.append(
                    f"{protocol} needs PIPELINE_KAFKA_SASL_MECHANISM "
                    "(SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN)"
                )
            if not (self.kafka_sasl_username or "").strip():
                problems.append(f"{protocol} needs PIPELINE_KAFKA_SASL_USERNAME")
            if self.kafka_sasl_password is None or not self.kafka_sasl_password.get_secret_value():
                problems.append(
                    f"{protocol} needs PIPELINE_KAFKA_SASL_PASSWORD or "
                    "PIPELINE_KAFKA_SASL_PASSWORD_FILE (not empty)"
                )
        else:
            unused = [
                name
                for name, value in (
                    ("PIPELINE_KAFKA_SASL_MECHANISM", self.kafka_sasl_mechanism),
                    ("PIPELINE_KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                    ("PIPELINE_KAFKA_SASL_PASSWORD[_FILE]", self.kafka_sasl_password),
                )
                if value is not None
            ]
            if unused:
                problems.append(
                    f"{', '.join(unused)} set, but PIPELINE_KAFKA_SECURITY_PROTOCOL={protocol}"
                    " does not use SASL (SASL_SSL or SASL_PLAINTEXT does)"
                )
        files = (
            ("PIPELINE_KAFKA_SSL_CAFILE", self.kafka_ssl_cafile),
            ("PIPELINE_KAFKA_SSL_CERTFILE", self.kafka_ssl_certfile),
            ("PIPELINE_KAFKA_SSL_KEYFILE", self.kafka_ssl_keyfile),
            ("PIPELINE_KAFKA_SSL_KEY_PASSWORD", self.kafka_ssl_key_password),
        )
        if not tls:
            unused = [name for name, value in files if value is not None]
            if unused:
                problems.append(
                    f"{', '.join(unused)} set, but PIPELINE_KAFKA_SECURITY_PROTOCOL={protocol}"
                    " does not use TLS (SSL or SASL_SSL does)"
                )
        elif (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            problems.append(
                "mutual TLS needs both PIPELINE_KAFKA_SSL_CERTFILE and "
                "PIPELINE_KAFKA_SSL_KEYFILE (a certificate without its key, or a key "
                "without its certificate)"
            )
        elif self.kafka_ssl_key_password is not None and self.kafka_ssl_keyfile is None:
            problems.append(
                "PIPELINE_KAFKA_SSL_KEY_PASSWORD set without PIPELINE_KAFKA_SSL_KEYFILE"
            )
        if problems:
            raise ValueError("; ".join(problems))
        if tls:
            # The files are used as the clients will use them: an unreadable CA file, a
            # key that does not match the certificate or a wrong key password is an
            # error now, not at the first connection.
            try:
                ssl_context_for(
                    self.kafka_ssl_cafile,
                    self.kafka_ssl_certfile,
                    self.kafka_ssl_keyfile,
                    self.kafka_ssl_key_password,
                )
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ValueError(
                    "PIPELINE_KAFKA_SSL_CAFILE/CERTFILE/KEYFILE/KEY_PASSWORD: cannot make a "
                    f"TLS context of them: {_ssl_reason(exc)}"
                ) from None
        return self

    @field_validator("web_token", "metrics_token")
    @classmethod
    def _strong(cls, value: SecretStr | None) -> SecretStr | None:
        # A blank token (an unset secret, say) would leave the views open without a
        # word; a short one would not resist guessing. The value is never in a message.
        if value is not None and len(value.get_secret_value().strip()) < MIN_TOKEN_CHARS:
            raise ValueError(
                f"a web token must have at least {MIN_TOKEN_CHARS} characters (not blank)"
            )
        return value

    @field_validator("web_advertised_host")
    @classmethod
    def _reachable(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or value.strip() in WILDCARD_HOSTS):
            raise ValueError(
                f"PIPELINE_WEB_ADVERTISED_HOST must be an address other workers can reach, "
                f"not {value!r}"
            )
        return value.strip() if value is not None else None

    @property
    def advertised_web_host(self) -> str:
        """Where other workers and clients reach this worker's web views, as the host
        part of a URL (an IPv6 address in brackets: Faust builds the URL by joining
        host and port with a colon)."""
        if self.web_advertised_host is not None:
            host = self.web_advertised_host
        elif self.web_host in WILDCARD_HOSTS:
            host = socket.gethostname()
        else:
            host = self.web_host
        return f"[{host}]" if ":" in host and not host.startswith("[") else host

    @property
    def bootstrap_servers(self) -> str:
        """The broker URL as a plain ``host:port`` list. Not for making a client: that
        takes :attr:`kafka`, which says how to connect too."""
        return ",".join(
            part.split("://", 1)[-1] for part in self.broker.replace(";", ",").split(",")
        )

    @cached_property
    def kafka(self) -> KafkaConnection:
        """How every Kafka client of this process connects: give each
        ``**settings.kafka.kwargs()`` (see :mod:`pipeline.connection`). Made once per
        settings object: its TLS context (files read, keys loaded) is shared by every
        client, as one context may be."""
        from pipeline.connection import KafkaConnection

        return KafkaConnection.from_settings(self)

    @property
    def deltas_topic(self) -> str:
        return self.topic_deltas or f"{self.app_id}-balance-deltas"

    @property
    def by_order_topic(self) -> str:
        return self.topic_by_order or f"{self.app_id}-raw-by-order"

    @property
    def progress_topic(self) -> str:
        """Internal: each source partition's committed offset, written in the same
        transaction as the offset itself (see :mod:`pipeline.eos`, "progress")."""
        return f"{self.app_id}-progress"

    @property
    def exactly_once(self) -> bool:
        return self.processing_guarantee is Guarantee.EXACTLY_ONCE

    @property
    def dedup_window_ms(self) -> int:
        return round(self.dedup_window_s * 1000)

    @property
    def dedup_grace_ms(self) -> int:
        return round(self.dedup_grace_s * 1000)

    def fix_enabled(self, name: str) -> bool:
        return name not in {p.strip() for p in self.disable_fix.split(",")}


def _check_readable(path: Path, name: str = "") -> None:
    """A file this process can read, or a ValueError naming it (never its content)."""
    if not path.is_file():
        raise ValueError(f"{name}{path}: no such file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{name}{path}: not readable by this user")


#: OpenSSL's reasons for refusing a CA file, a certificate or a key, in words
_SSL_REASONS = {
    "PEM_LIB": "a certificate or key file is not PEM, or the key password is wrong",
    "KEY_VALUES_MISMATCH": "the key does not belong to the certificate",
    "NO_CERTIFICATE_OR_CRL_FOUND": "the CA file holds no certificate",
    "BAD_DECRYPT": "the key password is wrong",
}


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        # The reason code, or without one (a wrong key password) the words of
        # "[SSL] PEM lib (_ssl.c:3926)".
        words = str(exc).partition("] ")[2].partition(" (")[0]
        reason = str(exc.reason or words.upper().replace(" ", "_"))
        return _SSL_REASONS.get(reason, reason.lower().replace("_", " ") or str(exc))
    if isinstance(exc, ValueError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
