"""The settings as the app factory maps them into ``faust.App``: explicitly, and never
from Faust's own environment variables."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.factory import MAX_POLL_RECORDS, METADATA_MAX_AGE_MS, create_app
from pipeline.settings import Settings


def test_the_consumer_hands_out_a_few_stage_queues_worth_per_poll(tmp_path: Path) -> None:
    from pipeline.eos.coordinator import QUEUE_HIGH

    app = create_app(Settings(app_id="t-factory", datadir=tmp_path))
    assert app.conf.broker_max_poll_records == MAX_POLL_RECORDS
    assert QUEUE_HIGH <= MAX_POLL_RECORDS <= 4 * QUEUE_HIGH
    # The fetch size stays Faust's (smaller fetches cost the dedup stage a third of
    # its throughput).
    assert app.conf.consumer_max_fetch_size == 1024**2


def test_fausts_own_environment_variables_do_not_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_URL", "kafka://elsewhere:1")
    monkeypatch.setenv("WEB_PORT", "1")
    monkeypatch.setenv("BROKER_MAX_POLL_RECORDS", "7")
    monkeypatch.setenv("BROKER_COMMIT_INTERVAL", "99")
    settings = Settings(app_id="t-factory", datadir=tmp_path, web_port=6123)
    app = create_app(settings)
    assert [str(u) for u in app.conf.broker] == [settings.broker]
    assert app.conf.web_port == 6123
    assert app.conf.broker_max_poll_records == MAX_POLL_RECORDS
    assert app.conf.broker_commit_interval == settings.commit_interval_s


def test_views_bind_to_loopback_and_advertise_it_by_default(tmp_path: Path) -> None:
    app = create_app(Settings(app_id="t-factory", datadir=tmp_path, web_port=6124))
    assert app.conf.web_bind == "127.0.0.1"
    assert str(app.conf.canonical_url) == "http://127.0.0.1:6124"


def test_a_worker_bound_to_every_interface_advertises_a_reachable_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bound to 0.0.0.0, a worker advertised "http://0.0.0.0:port" to the others, where
    # a view asked for a key it does not own sends the request: no other machine gets
    # there. Without an advertised address it is now the host name.
    monkeypatch.setattr(socket, "gethostname", lambda: "worker-7.internal")
    s = Settings(app_id="t-factory", datadir=tmp_path, web_host="0.0.0.0", web_port=6125)
    app = create_app(s)
    assert app.conf.web_bind == "0.0.0.0"
    assert str(app.conf.canonical_url) == "http://worker-7.internal:6125"

    monkeypatch.setenv("PIPELINE_WEB_ADVERTISED_HOST", "127.0.0.2")
    app = create_app(Settings(app_id="t-factory", datadir=tmp_path, web_host="0.0.0.0"))
    assert app.conf.web_bind == "0.0.0.0"
    assert str(app.conf.canonical_url) == "http://127.0.0.2:6066"


@pytest.mark.parametrize(
    ("bind", "advertised", "url"),
    [
        ("::1", None, "http://[::1]:6066"),
        ("0.0.0.0", "fd00::5", "http://[fd00::5]:6066"),
        ("0.0.0.0", "[fd00::5]", "http://[fd00::5]:6066"),
    ],
)
def test_an_ipv6_address_is_advertised_in_brackets(
    bind: str, advertised: str | None, url: str, tmp_path: Path
) -> None:
    s = Settings(
        app_id="t-factory", datadir=tmp_path, web_host=bind, web_advertised_host=advertised
    )
    app = create_app(s)
    assert app.conf.web_bind == bind
    assert str(app.conf.canonical_url) == url


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "  "])
def test_an_advertised_address_nobody_can_reach_is_refused(host: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="PIPELINE_WEB_ADVERTISED_HOST"):
        Settings(datadir=tmp_path, web_advertised_host=host)


def test_fausts_own_table_and_router_pages_are_off_unless_asked_for(tmp_path: Path) -> None:
    app = create_app(Settings(app_id="t-factory", datadir=tmp_path))
    assert not app.conf.web_router_enabled and not app.conf.web_tables_enabled
    served = [prefix for prefix, _ in app.web.blueprints._enabled]
    assert "/router" not in served and "/table" not in served
    on = create_app(Settings(app_id="t-factory", datadir=tmp_path, web_faust_pages=True))
    served = [prefix for prefix, _ in on.web.blueprints._enabled]
    assert "/router" in served and "/table" in served


def test_the_consumer_refreshes_its_view_of_the_topics_within_seconds(tmp_path: Path) -> None:
    # A group led with metadata that lacks its topics (a worker started while the broker
    # restarted) is assigned nothing until the next refresh: aiokafka's default, 5
    # minutes, failed the payments example's test in CI.
    app = create_app(Settings(app_id="t-factory", datadir=tmp_path))
    assert app.conf.consumer_metadata_max_age_ms == METADATA_MAX_AGE_MS <= 30_000


async def test_a_producer_request_times_out_in_seconds_not_faust_s_twenty_minutes(
    tmp_path: Path,
) -> None:
    # One connection whose answers were lost (a held EndTxn) kept a worker from committing
    # for as long as this timeout: Faust's default was 1,200 s.
    from pipeline.eos.faust.producer import TransactionalProducer

    app = create_app(Settings(app_id="t-factory", datadir=tmp_path))
    assert app.conf.producer_request_timeout == 30.0
    app = create_app(Settings(app_id="t-factory", datadir=tmp_path, producer_request_timeout_s=12))
    txn = TransactionalProducer.like_faust(app.producer, "t-factory-tid", 0.25)
    assert txn.producer.client._request_timeout_ms == 12_000
    await txn.producer.stop()
    with pytest.raises(ValidationError):
        Settings(producer_request_timeout_s=1200)  # past the transaction timeout


def test_a_worker_counts_as_rebalancing_until_its_tables_are_restored(tmp_path: Path) -> None:
    """In exactly-once mode Faust's rebalance ends before the coordinator restored the
    tables (pipeline.eos.restore): /stats, the metric and the stale header must not
    call the worker ready in between."""
    app = create_app(Settings(app_id="t-recovering", datadir=tmp_path / "eos"))
    assert app.recovering  # never settled: no assignment restored yet
    app.eos.settled_epoch = app.eos.unsettled_count  # what Coordinator.settle ends with
    assert not app.recovering
    app.eos.unsettle()  # a rebalance began; Faust's recovery may have ended since
    assert not app.rebalancing and app.recovering
    app.eos.settled_epoch = app.eos.unsettled_count  # what Coordinator.settle ends with
    assert not app.recovering
    # At least once, nothing is restored by the coordinator: Faust's flag alone.
    alo = create_app(
        Settings(
            app_id="t-recovering", datadir=tmp_path / "alo", processing_guarantee="at_least_once"
        )
    )
    alo.eos.unsettle()
    assert not alo.recovering
