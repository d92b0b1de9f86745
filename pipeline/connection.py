"""How every Kafka client of the project connects: one :class:`KafkaConnection`.

The pipeline's settings (``PIPELINE_BROKER`` and ``PIPELINE_KAFKA_*``, see
:class:`pipeline.settings.Settings`) become one frozen object, ``settings.kafka``: the
bootstrap servers and the security keyword arguments that aiokafka's producer, consumer
and admin client take. Every client the project makes is built with
``**settings.kafka.kwargs()`` (``tests/unit/test_connection.py`` parses the sources and
fails on one that is not); Faust's own clients get the same through
:meth:`KafkaConnection.faust_credentials`.

:func:`check_connection` is the preflight every process runs first: it connects as the
clients will and turns a refused password, an unknown user or an untrusted certificate
into one line (:class:`KafkaAccessError`), where aiokafka's clients only log
``Unable connect to ...`` and raise ``Unable to bootstrap from ...``, which the callers
retry.

This module imports neither Faust nor the pipeline's deciding code (``reconcile`` loads
it).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import SecretStr

if TYPE_CHECKING:
    from pipeline.settings import Settings

log = logging.getLogger(__name__)

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"]
SECURITY_PROTOCOLS: tuple[str, ...] = get_args(SecurityProtocol)
SASL_MECHANISMS: tuple[str, ...] = get_args(SaslMechanism)

#: Exit status of a process whose Kafka credentials or TLS setup the broker refused:
#: a configuration error (as ``pipeline.admin.EXIT_CONFIG``), which a restart repeats.
EXIT_KAFKA_ACCESS = 78

#: How long the preflight waits for the brokers in all (seconds).
PREFLIGHT_TIMEOUT_S = 10.0

#: Times a broker may close the connection before answering, before the preflight
#: calls it a protocol mismatch rather than a broker going down.
_CLOSED_EARLY_LIMIT = 3


def ssl_context_for(
    cafile: Path | str | None = None,
    certfile: Path | str | None = None,
    keyfile: Path | str | None = None,
    key_password: SecretStr | None = None,
) -> ssl.SSLContext:
    """The client TLS context: the broker's certificate checked against ``cafile`` (the
    system's CA store without one), host name checked, and the client certificate for
    mutual TLS. Raises ``ssl.SSLError`` or ``OSError`` on a file it cannot use."""
    from aiokafka.helpers import create_ssl_context

    def no_password() -> str:
        # Without this, OpenSSL asks for an encrypted key's password on the terminal.
        raise ValueError("the key file is encrypted: set PIPELINE_KAFKA_SSL_KEY_PASSWORD")

    return create_ssl_context(
        cafile=str(cafile) if cafile else None,
        certfile=str(certfile) if certfile else None,
        keyfile=str(keyfile) if keyfile else None,
        password=key_password.get_secret_value() if key_password is not None else no_password,
    )


@dataclass(frozen=True, slots=True)
class KafkaConnection:
    """The bootstrap servers and how to reach them: what every Kafka client takes.

    Its ``repr`` and ``str`` never show the SASL password or the key password (they
    are :class:`~pydantic.SecretStr` and left out of the ``repr``).
    """

    #: ``host:port[,host:port...]``
    servers: str
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = field(default=None, repr=False)
    #: the files the TLS context was made from (for messages and non-Python tools)
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    key_password: SecretStr | None = field(default=None, repr=False)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(f"unknown Kafka security protocol {self.security_protocol!r}")
        if self.sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ValueError(f"unknown SASL mechanism {self.sasl_mechanism!r}")
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError(f"{self.security_protocol} needs a user name and a password")
        if self.tls and self.ssl_context is None:
            raise ValueError(f"{self.security_protocol} needs an SSL context")

    @classmethod
    def plaintext(cls, servers: str) -> KafkaConnection:
        """No TLS, no SASL: a development broker (and the tests)."""
        return cls(servers=servers)

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaConnection:
        s = settings
        tls = s.kafka_security_protocol in ("SSL", "SASL_SSL")
        sasl = s.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")
        context = (
            ssl_context_for(
                s.kafka_ssl_cafile,
                s.kafka_ssl_certfile,
                s.kafka_ssl_keyfile,
                s.kafka_ssl_key_password,
            )
            if tls
            else None
        )

        def text(path: Path | None) -> str | None:
            return str(path) if path is not None and tls else None

        return cls(
            servers=s.bootstrap_servers,
            security_protocol=s.kafka_security_protocol,
            sasl_mechanism=s.kafka_sasl_mechanism if sasl else None,
            sasl_username=s.kafka_sasl_username if sasl else None,
            sasl_password=s.kafka_sasl_password if sasl else None,
            cafile=text(s.kafka_ssl_cafile),
            certfile=text(s.kafka_ssl_certfile),
            keyfile=text(s.kafka_ssl_keyfile),
            key_password=s.kafka_ssl_key_password if tls else None,
            ssl_context=context,
        )

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def hosts(self) -> list[tuple[str, int]]:
        """The bootstrap servers as ``(host, port)`` (port 9092 when left out)."""
        out = []
        for part in self.servers.split(","):
            part = part.strip()
            if not part:
                continue
            host, sep, port = part.rpartition(":")
            if not sep or not port.isdigit():
                host, port = part, "9092"
            out.append((host.strip("[]"), int(port)))
        return out

    def security_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of aiokafka's clients that say how to connect: none for
        ``PLAINTEXT`` (aiokafka's defaults)."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        out: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.tls:
            out["ssl_context"] = self.ssl_context
        if self.sasl:
            assert self.sasl_password is not None
            out["sasl_mechanism"] = self.sasl_mechanism
            out["sasl_plain_username"] = self.sasl_username
            out["sasl_plain_password"] = self.sasl_password.get_secret_value()
        return out

    def kwargs(self) -> dict[str, Any]:
        """``bootstrap_servers`` and :meth:`security_kwargs`: give every
        ``AIOKafkaProducer``, ``AIOKafkaConsumer`` and ``AIOKafkaAdminClient`` these."""
        return {"bootstrap_servers": self.servers, **self.security_kwargs()}

    def faust_credentials(self) -> Any:
        """Faust's ``broker_credentials`` for this connection (None: plaintext). Faust
        hands them to its consumer, its producer, its topic creation and, through the
        producer's ``_settings_auth()``, to our transactional producers."""
        if self.security_protocol == "PLAINTEXT":
            return None
        import faust

        if not self.sasl:
            return faust.SSLCredentials(self.ssl_context)
        assert self.sasl_password is not None
        # With an SSL context Faust's SASL credentials say SASL_SSL, without SASL_PLAINTEXT.
        return faust.SASLCredentials(
            username=self.sasl_username,
            password=self.sasl_password.get_secret_value(),
            ssl_context=self.ssl_context,
            mechanism=self.sasl_mechanism,
        )

    def librdkafka_config(self) -> dict[str, str]:
        """The same connection for a librdkafka client (Quix Streams, in ``bench``)."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        out = {"security.protocol": self.security_protocol.lower()}
        if self.sasl:
            assert self.sasl_password is not None and self.sasl_mechanism is not None
            out["sasl.mechanism"] = self.sasl_mechanism
            out["sasl.username"] = self.sasl_username or ""
            out["sasl.password"] = self.sasl_password.get_secret_value()
        if self.cafile:
            out["ssl.ca.location"] = self.cafile
        if self.certfile and self.keyfile:
            out["ssl.certificate.location"] = self.certfile
            out["ssl.key.location"] = self.keyfile
            if self.key_password is not None:
                out["ssl.key.password"] = self.key_password.get_secret_value()
        return out

    def java_properties(self) -> str:
        """The same connection as a Java client's properties file (Kafka's own tools, in
        ``bench``): PEM trust and key stores, the SASL login in ``sasl.jaas.config``.
        It holds the password: write it to a file only the user can read."""
        if self.security_protocol == "PLAINTEXT":
            return ""
        props: dict[str, str] = {"security.protocol": self.security_protocol}
        if self.sasl:
            assert self.sasl_password is not None and self.sasl_mechanism is not None
            module = (
                "org.apache.kafka.common.security.plain.PlainLoginModule"
                if self.sasl_mechanism == "PLAIN"
                else "org.apache.kafka.common.security.scram.ScramLoginModule"
            )
            props["sasl.mechanism"] = self.sasl_mechanism
            props["sasl.jaas.config"] = (
                f"{module} required username={_jaas_quoted(self.sasl_username or '')} "
                f"password={_jaas_quoted(self.sasl_password.get_secret_value())};"
            )
        if self.cafile:
            props["ssl.truststore.type"] = "PEM"
            props["ssl.truststore.location"] = self.cafile
        if self.certfile and self.keyfile:
            # Java takes a PEM key store as text (the key in PKCS#8).
            props["ssl.keystore.type"] = "PEM"
            props["ssl.keystore.certificate.chain"] = Path(self.certfile).read_text()
            props["ssl.keystore.key"] = Path(self.keyfile).read_text()
            if self.key_password is not None:
                props["ssl.key.password"] = self.key_password.get_secret_value()
        return "".join(f"{k}={_property_escaped(v)}\n" for k, v in props.items())

    def describe(self) -> str:
        """Where and how, for messages: never a secret."""
        how: str = self.security_protocol
        if self.sasl:
            how += f", {self.sasl_mechanism} as {self.sasl_username!r}"
        return f"{self.servers} ({how})"

    def __str__(self) -> str:
        return self.describe()


def as_connection(target: KafkaConnection | str) -> KafkaConnection:
    """``target`` itself, or a bare bootstrap string as a plaintext connection (tests
    and a development broker; the pipeline's own code always passes a connection)."""
    if isinstance(target, KafkaConnection):
        return target
    return KafkaConnection.plaintext(target)


def security_env(settings: Settings) -> dict[str, str]:
    """The ``PIPELINE_KAFKA_*`` variables that give a child process (a worker started by
    ``bench`` or ``chaos``) the same connection as ``settings``. A password read from a
    file is passed as the file's name."""
    s = settings
    values: dict[str, object | None] = {
        "SECURITY_PROTOCOL": s.kafka_security_protocol,
        "SSL_CAFILE": s.kafka_ssl_cafile,
        "SSL_CERTFILE": s.kafka_ssl_certfile,
        "SSL_KEYFILE": s.kafka_ssl_keyfile,
        "SASL_MECHANISM": s.kafka_sasl_mechanism,
        "SASL_USERNAME": s.kafka_sasl_username,
    }
    if s.kafka_ssl_key_password is not None:
        values["SSL_KEY_PASSWORD"] = s.kafka_ssl_key_password.get_secret_value()
    if s.kafka_sasl_password_file is not None:
        values["SASL_PASSWORD_FILE"] = s.kafka_sasl_password_file
    elif s.kafka_sasl_password is not None:
        values["SASL_PASSWORD"] = s.kafka_sasl_password.get_secret_value()
    return {f"PIPELINE_KAFKA_{k}": str(v) for k, v in values.items() if v is not None}


class _NoSaslExchange(logging.Filter):
    """aiokafka logs every request and response at DEBUG (``aiokafka.conn``), the SASL
    exchange too: with PLAIN the request holds the password as such, with SCRAM what an
    offline guess needs. Those arguments are replaced; the line stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(_is_sasl_exchange(a) for a in args):
            record.args = tuple(
                "<SASL exchange, not logged>" if _is_sasl_exchange(a) else a for a in args
            )
        return True


def _is_sasl_exchange(value: object) -> bool:
    return type(value).__name__.startswith(("SaslAuthenticate", "SaslHandShake"))


logging.getLogger("aiokafka.conn").addFilter(_NoSaslExchange())


# -- the preflight --------------------------------------------------------------------


class KafkaAccessError(Exception):
    """The broker refused this process's credentials or TLS setup: a configuration
    error, which no retry fixes. ``str()`` is one line, without a secret."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from, outermost first."""
    out: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        out.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return out


def _ca(conn: KafkaConnection) -> str:
    if conn.cafile:
        return f"CA file {conn.cafile}"
    return "the system's CA store; set PIPELINE_KAFKA_SSL_CAFILE"


def diagnose(exc: BaseException, conn: KafkaConnection, where: str) -> str | None:
    """The one line a failed connection attempt to ``where`` means, when it is one a
    retry cannot fix (credentials, TLS); None when it may be passing (a broker down or
    restarting, a timeout)."""
    from aiokafka import errors

    for cause in _causes(exc):
        if isinstance(cause, errors.IllegalSaslStateError):
            # What a listener without SASL answers a SASL handshake.
            return (
                f"kafka: the listener at {where} does not take SASL (ILLEGAL_SASL_STATE): "
                f"does PIPELINE_KAFKA_SECURITY_PROTOCOL={conn.security_protocol} match it?"
            )
        if isinstance(cause, errors.SaslAuthenticationFailed | errors.AuthenticationFailedError):
            return (
                f"kafka: authentication failed for user {conn.sasl_username!r} "
                f"({conn.sasl_mechanism}) at {where}: wrong password or unknown user "
                "(PIPELINE_KAFKA_SASL_USERNAME, PIPELINE_KAFKA_SASL_PASSWORD[_FILE])"
            )
        if isinstance(cause, errors.UnsupportedSaslMechanismError):
            text = str(cause)
            marker = "Enabled mechanisms are:"
            offered = text.partition(marker)[2].strip() if marker in text else ""
            return (
                f"kafka: the broker at {where} does not offer SASL mechanism "
                f"{conn.sasl_mechanism} (PIPELINE_KAFKA_SASL_MECHANISM)"
                + (f"; it offers {offered}" if offered else "")
            )
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or cause.reason or "certificate verify failed"
            return (
                f"kafka: TLS handshake with {where} failed: certificate verify failed: "
                f"{reason} ({_ca(conn)})"
            )
        if isinstance(cause, ssl.SSLError) and not isinstance(
            cause, ssl.SSLEOFError | ssl.SSLZeroReturnError
        ):
            reason = (cause.reason or str(cause)).lower().replace("_", " ")
            if "certificate required" in reason or "bad certificate" in reason:
                hint = (
                    "the broker wants a client certificate (PIPELINE_KAFKA_SSL_CERTFILE, "
                    "PIPELINE_KAFKA_SSL_KEYFILE)"
                    if conn.certfile is None
                    else f"the broker refused the client certificate {conn.certfile}"
                )
            elif "unknown ca" in reason or "certificate unknown" in reason:
                hint = f"the broker does not trust the client certificate {conn.certfile}"
            elif "wrong version number" in reason or "record layer failure" in reason:
                hint = (
                    f"the listener does not speak TLS (PIPELINE_KAFKA_SECURITY_PROTOCOL="
                    f"{conn.security_protocol})"
                )
            else:
                hint = "check PIPELINE_KAFKA_SECURITY_PROTOCOL and PIPELINE_KAFKA_SSL_*"
            return f"kafka: TLS handshake with {where} failed: {reason}: {hint}"
    return None


def _closed_early(exc: BaseException) -> bool:
    """Did the broker close the connection before it answered (what a listener of
    another protocol does: TLS receiving plaintext, SASL receiving no handshake)?"""
    from aiokafka import errors

    for cause in _causes(exc):
        if isinstance(
            cause,
            asyncio.IncompleteReadError
            | ssl.SSLEOFError
            | ssl.SSLZeroReturnError
            | ConnectionResetError,
        ):
            return True
        if isinstance(cause, errors.KafkaConnectionError) and "closed" in str(cause):
            return True
    return False


async def _attempt(conn: KafkaConnection, host: str, port: int, seconds: float) -> None:
    """Connect to one broker as the clients will (TLS, SASL) and ask for metadata."""
    from aiokafka.conn import create_conn
    from aiokafka.protocol.metadata import MetadataRequest

    kwargs = conn.security_kwargs()
    async with asyncio.timeout(seconds):
        broker = await create_conn(
            host,
            port,
            client_id="pipeline-preflight",
            request_timeout_ms=max(1, int(seconds * 1000)),
            **kwargs,
        )
        try:
            # A listener that wants SASL answers ApiVersions unauthenticated; the first
            # other request proves this client may talk to it.
            await broker.send(MetadataRequest([]))
        finally:
            broker.close()


async def _listener_speaks(host: str, port: int, seconds: float) -> str | None:
    """What a listener answers, tried both ways: ``"plaintext Kafka"`` when it answers an
    ApiVersions request in the clear, ``"TLS"`` when it answers a TLS handshake (even
    with an alert: a listener that wants a client certificate), None when it answers
    neither (nothing behind it)."""
    client = b"pipeline-preflight"
    body = struct.pack(">hhih", 18, 0, 0x5EED, len(client)) + client
    try:
        async with asyncio.timeout(seconds):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(struct.pack(">i", len(body)) + body)
                await writer.drain()
                head = await reader.readexactly(8)
                if struct.unpack(">ii", head)[1] == 0x5EED:
                    return "plaintext Kafka"
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass
    # Whether it speaks TLS, not whom to trust: no verification here, no data sent.
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(seconds):
            _, writer = await asyncio.open_connection(host, port, ssl=probe)
            writer.close()
            return "TLS"
    except ssl.SSLError as exc:
        # An alert is an answer in TLS; an end of the stream is none.
        return None if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError) else "TLS"
    except (OSError, TimeoutError):
        return None


async def check_connection(
    conn: KafkaConnection, timeout: float = PREFLIGHT_TIMEOUT_S
) -> str | None:
    """Connect to the bootstrap brokers as every client of this process will, within
    ``timeout`` seconds.

    Returns None once a broker accepted the connection and answered. Raises
    :class:`KafkaAccessError` with one line when the broker refused the credentials or
    the TLS setup (or kept closing the connection before answering: a listener of
    another protocol). Returns why when no broker could be reached: a broker that is
    down or starting is not this check's business, the clients wait for it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    closed: dict[str, int] = {}
    #: brokers found to answer nothing at all, and the line that says so
    silent: dict[str, str] = {}
    why = "no bootstrap server"
    while True:
        for host, port in conn.hosts:
            where = f"{host}:{port}"
            left = deadline - loop.time()
            if left <= 0:
                return why
            try:
                await _attempt(conn, host, port, left)
            except Exception as exc:
                line = diagnose(exc, conn, where)
                if line is not None:
                    raise KafkaAccessError(line) from None
                why = f"{where}: {type(exc).__name__}: {exc}" if str(exc) else where
                if _closed_early(exc) and where in silent:
                    why = silent[where]
                elif _closed_early(exc):
                    closed[where] = closed.get(where, 0) + 1
                    if closed[where] >= _CLOSED_EARLY_LIMIT:
                        # A listener of another protocol hangs up like this, and so does
                        # a proxy or load balancer whose broker is down (it accepts, then
                        # has nowhere to forward). Only the first is a configuration error.
                        speaks = await _listener_speaks(host, port, min(2.0, max(left, 0.1)))
                        if speaks is None:
                            why = silent[where] = (
                                f"{where} closes every connection before answering, in any "
                                "protocol (a proxy or load balancer whose broker is down?)"
                            )
                            log.debug("preflight: %s", why)
                            continue
                        raise KafkaAccessError(
                            f"kafka: the broker at {where} closed the connection before "
                            f"answering, {closed[where]} times, and it answers {speaks}: does "
                            f"PIPELINE_KAFKA_SECURITY_PROTOCOL={conn.security_protocol} match "
                            "its listener?"
                        ) from None
                log.debug("preflight: %s", why)
                continue
            return None
        if not closed or all(f"{h}:{p}" in silent for h, p in conn.hosts):
            # Every broker refused, timed out or answers nothing: down, or not there yet.
            return why
        await asyncio.sleep(min(0.5, max(0.0, deadline - loop.time())))


async def preflight(conn: KafkaConnection, timeout: float = PREFLIGHT_TIMEOUT_S) -> None:
    """:func:`check_connection`, an unreachable broker logged (the clients wait for it);
    :class:`KafkaAccessError` propagates."""
    why = await check_connection(conn, timeout)
    if why is not None:
        log.warning("kafka: no broker of %s answered yet (%s)", conn.describe(), why)


def run_preflight(conn: KafkaConnection, timeout: float = PREFLIGHT_TIMEOUT_S) -> None:
    """:func:`preflight` from synchronous code (the command line)."""
    asyncio.run(preflight(conn, timeout))


def require_access(conn: KafkaConnection, timeout: float = PREFLIGHT_TIMEOUT_S) -> None:
    """The preflight of a tool's ``main``: on refused credentials or TLS, the one line
    on stderr and exit status :data:`EXIT_KAFKA_ACCESS`."""
    try:
        run_preflight(conn, timeout)
    except KafkaAccessError as exc:
        print(exc.line, file=sys.stderr)
        raise SystemExit(EXIT_KAFKA_ACCESS) from None


def _jaas_quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _property_escaped(value: str) -> str:
    """A value for a Java ``.properties`` file (backslashes, line breaks)."""
    return value.replace("\\", "\\\\").replace("\r", "").replace("\n", "\\n").replace("\t", "\\t")


__all__ = [
    "EXIT_KAFKA_ACCESS",
    "SASL_MECHANISMS",
    "SECURITY_PROTOCOLS",
    "KafkaAccessError",
    "KafkaConnection",
    "as_connection",
    "check_connection",
    "diagnose",
    "preflight",
    "require_access",
    "run_preflight",
    "security_env",
    "ssl_context_for",
]
