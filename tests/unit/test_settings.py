"""pipeline.settings.Settings: defaults, PIPELINE_* overrides, immutability, derived values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.settings import Guarantee, Settings

pytestmark = pytest.mark.usefixtures("clean_env")


def test_defaults() -> None:
    s = Settings()
    assert s.broker == "kafka://127.0.0.1:9092"
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert s.partitions == 8
    assert s.processing_guarantee is Guarantee.EXACTLY_ONCE
    assert s.exactly_once is True
    assert s.dedup_window_s == 7 * 24 * 3600
    assert s.dedup_window_ms == 7 * 24 * 3600 * 1000
    assert s.dedup_grace_ms == 3600 * 1000
    assert s.app_id == "orders-pipeline"
    assert s.datadir == Path("./data")
    assert s.topic_raw == "orders.raw"
    assert s.topic_unique == "orders.unique"
    assert s.topic_dlq == "orders.dlq"
    assert s.disable_fix == ""
    assert s.crash_at is None


def test_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_BROKER", "kafka://broker-1:19092")
    monkeypatch.setenv("PIPELINE_PARTITIONS", "3")
    monkeypatch.setenv("PIPELINE_PROCESSING_GUARANTEE", "at_least_once")
    monkeypatch.setenv("PIPELINE_DEDUP_WINDOW_S", "60")
    monkeypatch.setenv("PIPELINE_DEDUP_GRACE_S", "0")
    monkeypatch.setenv("PIPELINE_DATADIR", "/tmp/x")
    monkeypatch.setenv("PIPELINE_TOPIC_RAW", "raw2")
    monkeypatch.setenv("PIPELINE_CRASH_AT", "after-flush")
    monkeypatch.setenv("PIPELINE_CRASH_AFTER", "2")
    s = Settings()
    assert s.broker == "kafka://broker-1:19092"
    assert s.bootstrap_servers == "broker-1:19092"
    assert s.partitions == 3
    assert s.processing_guarantee is Guarantee.AT_LEAST_ONCE
    assert s.exactly_once is False
    assert s.dedup_window_ms == 60_000
    assert s.dedup_grace_ms == 0
    assert s.datadir == Path("/tmp/x")
    assert s.topic_raw == "raw2"
    assert (s.crash_at, s.crash_after) == ("after-flush", 2)


def test_unprefixed_env_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER", "kafka://elsewhere:1")
    monkeypatch.setenv("PARTITIONS", "99")
    s = Settings()
    assert s.broker == "kafka://127.0.0.1:9092"
    assert s.partitions == 8


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PIPELINE_PARTITIONS", "0"),
        ("PIPELINE_PARTITIONS", "1025"),
        ("PIPELINE_PARTITIONS", "eight"),
        ("PIPELINE_DEDUP_WINDOW_S", "0"),
        ("PIPELINE_DEDUP_GRACE_S", "-1"),
        ("PIPELINE_PROCESSING_GUARANTEE", "maybe_once"),
        ("PIPELINE_EXPIRY_BATCH", "0"),
    ],
)
def test_invalid_env_is_rejected(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.partitions = 4  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.broker = "kafka://other:1"  # type: ignore[misc]
    assert s.partitions == 8
    assert s.broker == "kafka://127.0.0.1:9092"


@pytest.mark.parametrize(
    ("broker", "expected"),
    [
        ("kafka://127.0.0.1:9092", "127.0.0.1:9092"),
        ("127.0.0.1:9092", "127.0.0.1:9092"),
        ("kafka://a:1,kafka://b:2", "a:1,b:2"),
        ("kafka://a:1;kafka://b:2", "a:1,b:2"),
        ("kafka://a:1,b:2,aiokafka://c:3", "a:1,b:2,c:3"),
    ],
)
def test_bootstrap_servers_strips_scheme(
    monkeypatch: pytest.MonkeyPatch, broker: str, expected: str
) -> None:
    assert Settings(broker=broker).bootstrap_servers == expected
    monkeypatch.setenv("PIPELINE_BROKER", broker)
    assert Settings().bootstrap_servers == expected


def test_fix_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().fix_enabled("quiesce")
    assert Settings().fix_enabled("local-state")
    monkeypatch.setenv("PIPELINE_DISABLE_FIX", "quiesce,local-state")
    s = Settings()
    assert not s.fix_enabled("quiesce")
    assert not s.fix_enabled("local-state")
    assert s.fix_enabled("fence")
    assert s.fix_enabled("quiesce,local-state")


def test_fix_enabled_tolerates_spaces() -> None:
    s = Settings(disable_fix=" quiesce , local-state ")
    assert not s.fix_enabled("quiesce")
    assert not s.fix_enabled("local-state")
    assert s.fix_enabled("other")


@pytest.mark.parametrize("seconds", ["0.001", "1", "2.5", "60", "604800"])
def test_window_and_grace_in_ms(monkeypatch: pytest.MonkeyPatch, seconds: str) -> None:
    monkeypatch.setenv("PIPELINE_DEDUP_WINDOW_S", seconds)
    monkeypatch.setenv("PIPELINE_DEDUP_GRACE_S", seconds)
    s = Settings()
    expected = round(float(seconds) * 1000)
    assert s.dedup_window_ms == expected
    assert s.dedup_grace_ms == expected


@pytest.mark.parametrize("seconds", ["2.01", "4.02", "8.03"])
def test_window_ms_is_not_truncated_by_float_error(
    monkeypatch: pytest.MonkeyPatch, seconds: str
) -> None:
    monkeypatch.setenv("PIPELINE_DEDUP_WINDOW_S", seconds)
    monkeypatch.setenv("PIPELINE_DEDUP_GRACE_S", seconds)
    s = Settings()
    expected = round(float(seconds) * 1000)
    assert (s.dedup_window_ms, s.dedup_grace_ms) == (expected, expected)


TOKEN = "t0k3n-for-the-views-0123456789"


def test_a_blank_or_short_web_token_is_refused_and_never_echoed() -> None:
    for bad in ("", "   ", "short-token"):
        with pytest.raises(ValueError, match="at least 16 characters") as err:
            Settings(web_token=bad)  # type: ignore[arg-type]
        assert bad.strip() == "" or bad not in str(err.value)
    settings = Settings(web_token=TOKEN)  # type: ignore[arg-type]
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())
