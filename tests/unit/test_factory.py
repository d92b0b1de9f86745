"""The settings as the app factory maps them into ``faust.App``: explicitly, and never
from Faust's own environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.factory import MAX_POLL_RECORDS, create_app
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
