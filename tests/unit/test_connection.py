"""``pipeline.connection``: the one connection object every Kafka client gets, what it
gives aiokafka, Faust, librdkafka and Java's tools, and the preflight that turns refused
credentials or TLS into one line (issue 17). No broker: local sockets at most."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import errors as kafka_errors

from pipeline.connection import (
    KafkaAccessError,
    KafkaConnection,
    as_connection,
    check_connection,
    diagnose,
    security_env,
)
from pipeline.settings import Settings
from tests.unit.pki import KEY_PASSWORD, Pki

PASSWORD = "s3cr3t-Pa55word-never-shown"
SECURITY_KWARGS = {
    "security_protocol",
    "ssl_context",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
}


pytestmark = pytest.mark.usefixtures("clean_env")


def sasl_ssl(pki: Pki, **extra: Any) -> Settings:
    given: dict[str, Any] = {
        "broker": "kafka://127.0.0.1:9192",
        "kafka_security_protocol": "SASL_SSL",
        "kafka_ssl_cafile": pki.ca,
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "pipeline",
        "kafka_sasl_password": PASSWORD,
    }
    return Settings(**{**given, **extra})


# -- the kwargs ----------------------------------------------------------------------


def test_plaintext_gives_no_security_kwargs() -> None:
    conn = Settings(broker="kafka://h1:9092;kafka://h2:9093").kafka
    assert conn.kwargs() == {"bootstrap_servers": "h1:9092,h2:9093"}
    assert conn.security_kwargs() == {}
    assert conn.faust_credentials() is None
    assert as_connection("h:1") == KafkaConnection.plaintext("h:1")
    assert as_connection(conn) is conn


def test_sasl_ssl_gives_every_security_kwarg(pki: Pki) -> None:
    kwargs = sasl_ssl(pki).kafka.kwargs()
    assert set(kwargs) == {"bootstrap_servers", *SECURITY_KWARGS}
    assert kwargs["bootstrap_servers"] == "127.0.0.1:9192"
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "pipeline"
    assert kwargs["sasl_plain_password"] == PASSWORD
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    # The broker's certificate and host name are checked.
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is True


def test_sasl_plaintext_gives_no_tls_and_ssl_gives_no_sasl(pki: Pki) -> None:
    plain = Settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="u",
        kafka_sasl_password=PASSWORD,
    ).kafka.security_kwargs()
    assert set(plain) == SECURITY_KWARGS - {"ssl_context"}
    tls = Settings(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=pki.ca,
        kafka_ssl_certfile=pki.client_cert,
        kafka_ssl_keyfile=pki.client_key,
    ).kafka
    assert set(tls.security_kwargs()) == {"security_protocol", "ssl_context"}
    assert tls.certfile == str(pki.client_cert)


def test_a_connection_cannot_be_made_half() -> None:
    with pytest.raises(ValueError, match="needs a user name and a password"):
        KafkaConnection("h:1", "SASL_SSL", "SCRAM-SHA-512", "u", None)
    with pytest.raises(ValueError, match="needs an SSL context"):
        KafkaConnection("h:1", "SSL")


def test_bootstrap_hosts() -> None:
    assert KafkaConnection.plaintext("a:1, b:2,c,[::1]:3").hosts == [
        ("a", 1),
        ("b", 2),
        ("c", 9092),
        ("::1", 3),
    ]


async def test_aiokafkas_three_clients_take_the_kwargs(pki: Pki) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient

    conn = sasl_ssl(pki).kafka
    producer = AIOKafkaProducer(**conn.kwargs())
    consumer = AIOKafkaConsumer(**conn.kwargs())
    admin = AIOKafkaAdminClient(**conn.kwargs())
    for client in (producer.client, consumer._client, admin._client):
        assert client._security_protocol == "SASL_SSL"
        assert client._sasl_mechanism == "SCRAM-SHA-512"
        assert client._sasl_plain_username == "pipeline"
        assert client._sasl_plain_password == PASSWORD
        assert client._ssl_context is conn.ssl_context


# -- Faust and the transactional producers -------------------------------------------


async def test_faust_and_the_transactional_producers_get_the_credentials(
    pki: Pki, tmp_path: Path
) -> None:
    import faust
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from pipeline.eos.faust.producer import TransactionalProducer
    from pipeline.factory import create_app

    app = create_app(sasl_ssl(pki, app_id="t-connection", datadir=tmp_path))
    credentials = app.conf.broker_credentials
    assert isinstance(credentials, faust.SASLCredentials)
    # Faust's consumer and client consumer take these (Consumer._create_*_consumer) ...
    auth = credentials_to_aiokafka_auth(credentials, app.conf.ssl_context)
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_plain_password"] == PASSWORD
    assert isinstance(auth["ssl_context"], ssl.SSLContext)
    # ... its producer too, and our transactional producers take the producer's.
    faust_auth = app.producer._settings_auth()
    assert faust_auth == auth
    tx = TransactionalProducer.like_faust(app.producer, "t-connection-raw-0", 0.25)
    client = tx.producer.client
    assert client._security_protocol == "SASL_SSL"
    assert client._sasl_mechanism == "SCRAM-SHA-512"
    assert client._sasl_plain_username == "pipeline"
    assert client._sasl_plain_password == PASSWORD
    assert client._ssl_context is auth["ssl_context"]
    assert PASSWORD not in repr(credentials)


async def test_faust_gets_tls_alone_and_plaintext(pki: Pki, tmp_path: Path) -> None:
    import faust

    from pipeline.factory import create_app

    tls = Settings(
        app_id="t-connection",
        datadir=tmp_path,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=pki.ca,
        kafka_ssl_certfile=pki.client_cert,
        kafka_ssl_keyfile=pki.client_key,
    )
    app = create_app(tls)
    assert isinstance(app.conf.broker_credentials, faust.SSLCredentials)
    assert app.producer._settings_auth()["security_protocol"] == "SSL"
    plain = create_app(Settings(app_id="t-connection-2", datadir=tmp_path))
    assert plain.conf.broker_credentials is None
    assert plain.producer._settings_auth() == {"security_protocol": "PLAINTEXT"}


def test_faust_reading_broker_credentials_from_its_environment_is_warned_of(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.factory import create_app

    clean_env.setenv("BROKER_CREDENTIALS", "whatever")
    with caplog.at_level(logging.WARNING, logger="pipeline.factory"):
        app = create_app(Settings(app_id="t-connection", datadir=tmp_path))
    assert app.conf.broker_credentials is None
    assert "BROKER_CREDENTIALS is set but ignored" in caplog.text


# -- other clients: Quix (librdkafka), Kafka's Java tools, child processes -----------


def test_librdkafka_and_java_settings(pki: Pki) -> None:
    conn = sasl_ssl(
        pki,
        kafka_ssl_certfile=pki.client_cert,
        kafka_ssl_keyfile=pki.client_key_encrypted,
        kafka_ssl_key_password=KEY_PASSWORD,
    ).kafka
    assert conn.librdkafka_config() == {
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "pipeline",
        "sasl.password": PASSWORD,
        "ssl.ca.location": str(pki.ca),
        "ssl.certificate.location": str(pki.client_cert),
        "ssl.key.location": str(pki.client_key_encrypted),
        "ssl.key.password": KEY_PASSWORD,
    }
    props = conn.java_properties()
    lines = dict(line.split("=", 1) for line in props.splitlines())
    assert lines["security.protocol"] == "SASL_SSL"
    assert lines["sasl.jaas.config"] == (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="pipeline" password="{PASSWORD}";'
    )
    assert lines["ssl.truststore.location"] == str(pki.ca)
    # PEM text on one line each, with escaped line breaks.
    assert lines["ssl.keystore.certificate.chain"].startswith("-----BEGIN CERTIFICATE-----\\n")
    assert KafkaConnection.plaintext("h:1").java_properties() == ""
    assert KafkaConnection.plaintext("h:1").librdkafka_config() == {}


def test_java_properties_quote_what_needs_it() -> None:
    conn = KafkaConnection(
        "h:1", "SASL_PLAINTEXT", "PLAIN", 'we"ird\\user', sasl_password=_secret('p"w\\x\ny')
    )
    jaas = dict(line.split("=", 1) for line in conn.java_properties().splitlines())[
        "sasl.jaas.config"
    ]
    # JAAS escapes (\" and \\), then the properties file's (\\ and \n).
    assert jaas == (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        'username="we\\\\"ird\\\\\\\\user" password="p\\\\"w\\\\\\\\x\\ny";'
    )


def _secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


def test_a_child_process_gets_the_same_connection(pki: Pki, tmp_path: Path) -> None:
    from pipeline.tools.procs import settings_from

    password_file = tmp_path / "pw"
    password_file.write_text(PASSWORD + "\n")
    given = sasl_ssl(pki, kafka_sasl_password=None, kafka_sasl_password_file=password_file)
    env = security_env(given)
    # A password read from a file travels as the file's name.
    assert env["PIPELINE_KAFKA_SASL_PASSWORD_FILE"] == str(password_file)
    assert all(PASSWORD not in value for value in env.values())
    child = settings_from({"PIPELINE_BROKER": given.broker, **env})
    assert child.kafka == given.kafka
    assert security_env(Settings()) == {"PIPELINE_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}


# -- the preflight -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
    context: ssl.SSLContext | None = None,
) -> AsyncIterator[int]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def _read_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # What a TLS listener does with a plaintext request (and a SASL one with a request
    # before the handshake): it reads, and closes.
    await reader.read(4)
    writer.close()


async def test_a_broker_not_there_is_not_this_checks_business() -> None:
    conn = KafkaConnection.plaintext(f"127.0.0.1:{_free_port()}")
    loop = asyncio.get_running_loop()
    started = loop.time()
    why = await check_connection(conn, timeout=5)
    assert why is not None and "127.0.0.1" in why
    assert loop.time() - started < 2


async def test_a_listener_that_hangs_up_in_every_protocol_is_not_there_yet() -> None:
    # What a proxy or load balancer whose broker is down does (chaos's fault proxy while
    # the broker restarts): it accepts, then hangs up. Not a configuration error: the
    # clients wait, as for a broker that is down.
    async for port in _server(_read_then_hang_up):
        conn = KafkaConnection.plaintext(f"127.0.0.1:{port}")
        why = await check_connection(conn, timeout=4)
        assert why is not None and "closes every connection before answering" in why


async def test_a_plaintext_client_at_a_listener_that_hangs_up_on_it_and_speaks_tls(
    pki: Pki,
) -> None:
    async for port in _server(_read_then_hang_up, _server_context(pki)):
        conn = KafkaConnection.plaintext(f"127.0.0.1:{port}")
        with pytest.raises(KafkaAccessError, match="and it answers TLS: does PIPELINE_KAFKA"):
            await check_connection(conn, timeout=10)


async def _plaintext_kafka(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # Answers a request in the clear with its correlation id; hangs up on anything else
    # (a TLS ClientHello read as a size is hundreds of megabytes).
    try:
        (size,) = struct.unpack(">i", await reader.readexactly(4))
        if not 8 <= size < 1 << 20:
            return
        body = await reader.readexactly(size)
        writer.write(struct.pack(">i", 4) + body[4:8])
        await writer.drain()
        await reader.read(1)
    except (asyncio.IncompleteReadError, OSError):
        pass
    finally:
        writer.close()


async def test_a_tls_client_at_a_plaintext_listener_is_told_what_it_speaks(pki: Pki) -> None:
    async for port in _server(_plaintext_kafka):
        settings = Settings(
            broker=f"127.0.0.1:{port}", kafka_security_protocol="SSL", kafka_ssl_cafile=pki.ca
        )
        with pytest.raises(KafkaAccessError, match="answers plaintext Kafka"):
            await check_connection(settings.kafka, timeout=10)


def _server_context(pki: Pki, *, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    context.verify_mode = ssl.CERT_REQUIRED if client_cert else ssl.CERT_NONE
    return context


async def _wait_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(4)
    writer.close()


async def test_an_untrusted_broker_certificate_fails_with_one_line(pki: Pki) -> None:
    async for port in _server(_wait_then_hang_up, _server_context(pki)):
        settings = Settings(
            broker=f"127.0.0.1:{port}",
            kafka_security_protocol="SSL",
            kafka_ssl_cafile=pki.other_ca,
        )
        with pytest.raises(KafkaAccessError) as caught:
            await check_connection(settings.kafka, timeout=10)
        line = caught.value.line
        assert line.startswith(f"kafka: TLS handshake with 127.0.0.1:{port} failed: ")
        assert "certificate verify failed" in line and str(pki.other_ca) in line
        assert "\n" not in line


def _serve_tls(conn: socket.socket, context: ssl.SSLContext) -> None:
    """One TLS connection through memory BIOs: a refused handshake's alert is sent, and
    what the client sent meanwhile read, before the connection closes (a close with
    unread data would reset it, and the client would never see the alert)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=True)
    conn.settimeout(5)
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    conn.sendall(outgoing.read())
                data = conn.recv(65536)
                if not data:
                    return
                incoming.write(data)
    except ssl.SSLError:
        pass
    if outgoing.pending:
        conn.sendall(outgoing.read())
    conn.settimeout(0.5)
    with contextlib.suppress(OSError):
        conn.recv(65536)
        while conn.recv(65536):
            pass


@contextlib.contextmanager
def _blocking_tls_server(context: ssl.SSLContext) -> Iterator[int]:
    """A TLS listener in a thread that refuses like a broker (see _serve_tls)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                _serve_tls(conn, context)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()


async def test_a_listener_that_wants_a_client_certificate_says_so(pki: Pki) -> None:
    with _blocking_tls_server(_server_context(pki, client_cert=True)) as port:
        settings = Settings(
            broker=f"127.0.0.1:{port}", kafka_security_protocol="SSL", kafka_ssl_cafile=pki.ca
        )
        with pytest.raises(KafkaAccessError, match="wants a client certificate"):
            await check_connection(settings.kafka, timeout=10)
        # With a certificate the server's CA signed, the handshake passes (and the fake
        # broker hangs up: not a TLS problem).
        mutual = Settings(
            broker=f"127.0.0.1:{port}",
            kafka_security_protocol="SSL",
            kafka_ssl_cafile=pki.ca,
            kafka_ssl_certfile=pki.client_cert,
            kafka_ssl_keyfile=pki.client_key,
        )
        with pytest.raises(KafkaAccessError, match="closed the connection before answering"):
            await check_connection(mutual.kafka, timeout=10)


def _sasl_conn() -> KafkaConnection:
    return KafkaConnection(
        "h:1", "SASL_PLAINTEXT", "SCRAM-SHA-512", "pipeline", sasl_password=_secret(PASSWORD)
    )


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (
            kafka_errors.SaslAuthenticationFailed(
                "Authentication failed during authentication due to invalid credentials with "
                "SASL mechanism SCRAM-SHA-512"
            ),
            "kafka: authentication failed for user 'pipeline' (SCRAM-SHA-512) at h:1: wrong "
            "password or unknown user",
        ),
        (
            kafka_errors.UnsupportedSaslMechanismError(
                "Kafka broker does not support SCRAM-SHA-512 sasl mechanism. Enabled "
                "mechanisms are: ['PLAIN']"
            ),
            "does not offer SASL mechanism SCRAM-SHA-512 (PIPELINE_KAFKA_SASL_MECHANISM); "
            "it offers ['PLAIN']",
        ),
        (
            kafka_errors.IllegalSaslStateError(),
            "kafka: the listener at h:1 does not take SASL (ILLEGAL_SASL_STATE): does "
            "PIPELINE_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT match it?",
        ),
    ],
)
def test_refused_credentials_are_one_line_without_the_password(
    error: Exception, words: str
) -> None:
    line = diagnose(error, _sasl_conn(), "h:1")
    assert line is not None and words in line
    assert PASSWORD not in line and "\n" not in line


def test_a_tls_error_behind_a_closed_connection_is_found() -> None:
    # TLS 1.3: the broker's refusal of a client certificate arrives with the first
    # read, and aiokafka reports "Connection ... closed" caused by it.
    cause = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert")
    cause.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"  # type: ignore[misc]
    error = kafka_errors.KafkaConnectionError("Connection at h:1 closed")
    error.__cause__ = cause
    conn = KafkaConnection.plaintext("h:1")
    line = diagnose(error, conn, "h:1")
    assert line is not None and "the broker wants a client certificate" in line


def test_passing_trouble_is_no_verdict() -> None:
    conn = _sasl_conn()
    assert diagnose(ConnectionRefusedError(111, "refused"), conn, "h:1") is None
    assert diagnose(TimeoutError(), conn, "h:1") is None
    assert diagnose(kafka_errors.KafkaConnectionError("closed"), conn, "h:1") is None


# -- where the preflight runs ---------------------------------------------------------


def test_every_command_runs_the_preflight_first(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pipeline.connection
    from pipeline.__main__ import main

    called: list[str] = []

    def refused(conn: KafkaConnection, timeout: float = 0) -> None:
        called.append(conn.servers)
        raise KafkaAccessError("kafka: authentication failed for user 'x' (PLAIN) at h:1")

    monkeypatch.setattr(pipeline.connection, "run_preflight", refused)
    for argv in (
        ["status"],
        ["produce", "--count", "1"],
        ["reconcile"],
        ["bench", "--quick"],
        ["chaos"],
        ["sink", "--db", "x.db"],
        ["outbox-relay", "--db", "x.db"],
    ):
        assert main(argv) == 78, argv
        assert capsys.readouterr().err == (
            "kafka: authentication failed for user 'x' (PLAIN) at h:1\n"
        ), argv
    assert len(called) == 7
    # The database alone: no Kafka, no preflight.
    monkeypatch.setattr(
        "pipeline.tools.shop.produce_via_outbox", lambda args, settings: called.append("db") or 0
    )
    assert main(["produce", "--via-outbox", "--db", "x.db"]) == 0
    assert called[-1] == "db"


async def test_the_worker_exits_with_one_line_before_any_client_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import pipeline.connection
    from pipeline.factory import create_app

    async def refused(conn: KafkaConnection, timeout: float = 0) -> None:
        raise KafkaAccessError("kafka: TLS handshake with h:1 failed: certificate verify failed")

    def exit_(code: int) -> None:
        raise SystemExit(code)

    declared: list[str] = []

    async def declare(self: Any) -> None:
        declared.append("topics")

    monkeypatch.setattr(pipeline.connection, "preflight", refused)
    monkeypatch.setattr(os, "_exit", exit_)
    app = create_app(Settings(app_id="t-connection", datadir=tmp_path))
    monkeypatch.setattr(type(app), "_declare_topics", declare)
    with (
        caplog.at_level(logging.CRITICAL, logger="pipeline.factory"),
        pytest.raises(SystemExit) as caught,
    ):
        await app.on_first_start()
    assert caught.value.code == 78
    assert declared == []
    assert caplog.messages == [
        "refusing to start: kafka: TLS handshake with h:1 failed: certificate verify failed"
    ]


def test_aiokafkas_debug_log_never_shows_the_sasl_exchange(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # aiokafka logs each request at DEBUG; PLAIN's holds the password as such.
    from aiokafka.protocol.admin import SaslAuthenticateRequest_v0

    import pipeline.connection  # noqa: F401  (installs the filter)

    request = SaslAuthenticateRequest_v0(b"\x00pipeline\x00" + PASSWORD.encode())
    assert PASSWORD in str(request)
    with caplog.at_level(logging.DEBUG, logger="aiokafka.conn"):
        logging.getLogger("aiokafka.conn").debug("Request to %s:%d %d: %s", "h", 1, 7, request)
    assert caplog.messages == ["Request to h:1 7: <SASL exchange, not logged>"]
