"""The Kafka security settings (``PIPELINE_KAFKA_*``): what is taken, what is refused,
and that no rendering of the settings or of an error shows a secret (issue 17)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from pipeline.settings import Settings
from tests.unit.pki import KEY_PASSWORD, Pki

PASSWORD = "s3cr3t-Pa55word-never-shown"
TOKEN = "web-token-never-shown-0123456789"


pytestmark = pytest.mark.usefixtures("clean_env")


def sasl(**extra: object) -> dict[str, object]:
    return {
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "pipeline",
        "kafka_sasl_password": PASSWORD,
        **extra,
    }


def test_plaintext_by_default() -> None:
    s = Settings()
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert s.kafka_sasl_password is None
    assert s.kafka_ssl_cafile is None
    assert s.kafka.security_protocol == "PLAINTEXT"


def test_everything_from_the_environment(
    clean_env: pytest.MonkeyPatch, pki: Pki, tmp_path: Path
) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text(PASSWORD + "\n")
    for name, value in {
        "BROKER": "kafka://b1:9192,kafka://b2:9192",
        "KAFKA_SECURITY_PROTOCOL": "sasl_ssl",  # any case
        "KAFKA_SSL_CAFILE": str(pki.ca),
        "KAFKA_SSL_CERTFILE": str(pki.client_cert),
        "KAFKA_SSL_KEYFILE": str(pki.client_key_encrypted),
        "KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD,
        "KAFKA_SASL_MECHANISM": "scram-sha-256",
        "KAFKA_SASL_USERNAME": "pipeline",
        "KAFKA_SASL_PASSWORD_FILE": str(password_file),
    }.items():
        clean_env.setenv(f"PIPELINE_{name}", value)
    s = Settings()
    assert s.kafka_security_protocol == "SASL_SSL"
    assert s.kafka_sasl_mechanism == "SCRAM-SHA-256"
    assert s.kafka_sasl_username == "pipeline"
    assert s.kafka_sasl_password is not None
    assert s.kafka_sasl_password.get_secret_value() == PASSWORD
    assert s.kafka_ssl_cafile == pki.ca
    assert s.kafka.servers == "b1:9192,b2:9192"


@pytest.mark.parametrize(
    ("content", "password"),
    [
        (PASSWORD + "\n", PASSWORD),
        (PASSWORD + "\r\n", PASSWORD),
        (PASSWORD, PASSWORD),
        # One line break is stripped, not every one: the rest is the password's.
        (PASSWORD + "\n\n", PASSWORD + "\n"),
        (" " + PASSWORD + " \n", " " + PASSWORD + " "),
    ],
)
def test_the_password_file_loses_one_trailing_line_break(
    tmp_path: Path, content: str, password: str
) -> None:
    path = tmp_path / "pw"
    path.write_text(content, newline="")
    s = Settings(**sasl(kafka_sasl_password=None, kafka_sasl_password_file=path))
    assert s.kafka_sasl_password is not None
    assert s.kafka_sasl_password.get_secret_value() == password
    assert s.kafka_sasl_password_file == path


def test_the_password_and_its_file_together_are_refused(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pw"
    path.write_text("other\n")
    clean_env.setenv("PIPELINE_KAFKA_SASL_PASSWORD", PASSWORD)
    clean_env.setenv("PIPELINE_KAFKA_SASL_PASSWORD_FILE", str(path))
    with pytest.raises(ValidationError, match="not both") as caught:
        Settings(**{k: v for k, v in sasl().items() if k != "kafka_sasl_password"})
    assert PASSWORD not in str(caught.value)


def test_a_missing_password_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no such file"):
        Settings(**sasl(kafka_sasl_password=None, kafka_sasl_password_file=tmp_path / "gone"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_password_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text(PASSWORD)
    path.chmod(0)
    with pytest.raises(ValidationError, match="not readable") as caught:
        Settings(**sasl(kafka_sasl_password=None, kafka_sasl_password_file=path))
    assert PASSWORD not in str(caught.value)


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("\n")
    with pytest.raises(ValidationError, match="PIPELINE_KAFKA_SASL_PASSWORD"):
        Settings(**sasl(kafka_sasl_password=None, kafka_sasl_password_file=path))


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        ("kafka_sasl_mechanism", "PIPELINE_KAFKA_SASL_MECHANISM"),
        ("kafka_sasl_username", "PIPELINE_KAFKA_SASL_USERNAME"),
        ("kafka_sasl_password", "PIPELINE_KAFKA_SASL_PASSWORD"),
    ],
)
@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT"])
def test_sasl_needs_a_mechanism_a_user_and_a_password(
    protocol: str, missing: str, named: str
) -> None:
    given = sasl(kafka_security_protocol=protocol)
    del given[missing]
    with pytest.raises(ValidationError, match=named) as caught:
        Settings(**given)  # type: ignore[arg-type]
    assert PASSWORD not in str(caught.value)


def test_a_blank_user_name_is_refused() -> None:
    with pytest.raises(ValidationError, match="PIPELINE_KAFKA_SASL_USERNAME"):
        Settings(**sasl(kafka_sasl_username="  "))


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL"])
def test_sasl_settings_without_sasl_are_refused(protocol: str) -> None:
    # An operator who set a password believes the clients authenticate: they would not.
    with pytest.raises(ValidationError, match="does not use SASL") as caught:
        Settings(kafka_security_protocol=protocol, kafka_sasl_password=PASSWORD)
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SASL_PLAINTEXT"])
def test_tls_files_without_tls_are_refused(protocol: str, pki: Pki) -> None:
    extra = sasl(kafka_security_protocol=protocol) if protocol.startswith("SASL") else {}
    with pytest.raises(ValidationError, match="does not use TLS"):
        Settings(**{**extra, "kafka_security_protocol": protocol, "kafka_ssl_cafile": pki.ca})


def test_a_certificate_without_its_key_is_refused(pki: Pki) -> None:
    with pytest.raises(ValidationError, match="both PIPELINE_KAFKA_SSL_CERTFILE and"):
        Settings(kafka_security_protocol="SSL", kafka_ssl_certfile=pki.client_cert)
    with pytest.raises(ValidationError, match="both PIPELINE_KAFKA_SSL_CERTFILE and"):
        Settings(kafka_security_protocol="SSL", kafka_ssl_keyfile=pki.client_key)


def test_a_key_password_without_a_key_is_refused() -> None:
    with pytest.raises(ValidationError, match="KEY_PASSWORD set without"):
        Settings(kafka_security_protocol="SSL", kafka_ssl_key_password=KEY_PASSWORD)


def test_tls_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no such file"):
        Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "ca.pem")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"kafka_ssl_cafile": "client_key"}, "holds no certificate"),
        ({"kafka_ssl_keyfile": "server_key"}, "does not belong to the certificate"),
        ({"kafka_ssl_keyfile": "client_key_encrypted"}, "set PIPELINE_KAFKA_SSL_KEY_PASSWORD"),
        (
            {"kafka_ssl_keyfile": "client_key_encrypted", "kafka_ssl_key_password": "wrong"},
            "key password is wrong",
        ),
    ],
)
def test_tls_files_are_used_as_the_clients_will(
    pki: Pki, change: dict[str, str], words: str
) -> None:
    given: dict[str, object] = {
        "kafka_security_protocol": "SSL",
        "kafka_ssl_cafile": pki.ca,
        "kafka_ssl_certfile": pki.client_cert,
        "kafka_ssl_keyfile": pki.client_key,
    }
    for name, value in change.items():
        given[name] = getattr(pki, value) if hasattr(pki, value) else value
    with pytest.raises(ValidationError, match=words) as caught:
        Settings(**given)  # type: ignore[arg-type]
    assert KEY_PASSWORD not in str(caught.value)


def test_an_encrypted_key_with_its_password_is_taken(pki: Pki) -> None:
    s = Settings(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=pki.ca,
        kafka_ssl_certfile=pki.client_cert,
        kafka_ssl_keyfile=pki.client_key_encrypted,
        kafka_ssl_key_password=SecretStr(KEY_PASSWORD),
    )
    assert s.kafka.ssl_context is not None


@pytest.mark.parametrize(
    ("name", "value"),
    [("kafka_security_protocol", "SASL_SSL_PLUS"), ("kafka_sasl_mechanism", "GSSAPI")],
)
def test_unknown_protocols_and_mechanisms_are_refused(name: str, value: str) -> None:
    with pytest.raises(ValidationError):
        Settings(**{**sasl(), name: value})  # type: ignore[arg-type]


def test_the_settings_stay_frozen() -> None:
    s = Settings(**sasl(kafka_security_protocol="SASL_PLAINTEXT"))
    with pytest.raises(ValidationError):
        s.kafka_sasl_password = SecretStr("other")  # type: ignore[misc]


# -- secrets stay secret ---------------------------------------------------------------


def test_no_rendering_of_the_settings_shows_a_secret(pki: Pki, tmp_path: Path) -> None:
    s = Settings(
        **sasl(
            kafka_ssl_cafile=pki.ca,
            kafka_ssl_certfile=pki.client_cert,
            kafka_ssl_keyfile=pki.client_key_encrypted,
            kafka_ssl_key_password=KEY_PASSWORD,
        ),
        web_token=TOKEN,
    )
    conn = s.kafka
    renderings = {
        "repr(settings)": repr(s),
        "str(settings)": str(s),
        "model_dump_json": s.model_dump_json(),
        "model_dump": str(s.model_dump()),
        "repr(connection)": repr(conn),
        "str(connection)": str(conn),
        "describe": conn.describe(),
        "faust credentials": repr(conn.faust_credentials()),
    }
    for what, text in renderings.items():
        for secret in (PASSWORD, KEY_PASSWORD, TOKEN):
            assert secret not in text, (what, text)
    # ... while the clients get them.
    assert conn.kwargs()["sasl_plain_password"] == PASSWORD
    assert "pipeline" in conn.describe() and "SCRAM-SHA-512" in conn.describe()


@pytest.mark.parametrize(
    "given",
    [
        {"kafka_sasl_password": PASSWORD},  # with PLAINTEXT
        {"kafka_sasl_mechanism": PASSWORD},  # pasted into the wrong variable
        {"kafka_security_protocol": PASSWORD},
        {
            "kafka_sasl_username": "u",
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_password": PASSWORD,
        },
        {"kafka_ssl_key_password": PASSWORD, "kafka_security_protocol": "SSL"},
    ],
)
def test_a_validation_error_never_shows_the_password(given: dict[str, str]) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**given)  # type: ignore[arg-type]
    for text in (str(caught.value), repr(caught.value)):
        assert PASSWORD not in text
        assert PASSWORD.upper() not in text  # the mechanism is upper-cased first


def test_the_command_line_reports_a_refused_setting_without_the_password(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.__main__ import main

    clean_env.setenv("PIPELINE_KAFKA_SASL_MECHANISM", PASSWORD)
    clean_env.setenv("PIPELINE_KAFKA_SASL_PASSWORD", PASSWORD)
    assert main(["status"]) == 78
    err = capsys.readouterr().err
    assert "settings: PIPELINE_KAFKA_SASL_MECHANISM" in err
    assert PASSWORD not in err and PASSWORD.upper() not in err
