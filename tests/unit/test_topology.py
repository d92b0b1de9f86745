"""The order pipeline as declared through the public API (``pipeline/topology.py``):
the names a running deployment depends on, and the web server it builds, without a
broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.settings import Settings
from pipeline.worker import build


def _settings(tmp_path: Path, **extra: object) -> Settings:
    return Settings(app_id="t-topo", datadir=tmp_path, **extra)  # type: ignore[arg-type]


def test_the_tables_and_internal_topics_keep_the_names_deployments_have(
    tmp_path: Path,
) -> None:
    topo = build(_settings(tmp_path))
    pipe = topo.pipe
    # Renaming a table loses its changelog's state; renaming a hop loses its records.
    assert set(pipe.tables) == {"dedup", "orders", "users.balances"}
    changelogs = {t.changelog_topic.get_topic_name() for t in topo.app.tables.values()}
    assert changelogs == {
        "t-topo-dedup-changelog",
        "t-topo-orders-changelog",
        "t-topo-users.balances-changelog",
    }
    stages = pipe.stages
    assert stages["dedup"].processed_from == "t-topo-raw-by-order"
    assert stages["orders"].source == "orders.unique"
    assert stages["balances"].source == "t-topo-balance-deltas"
    assert set(stages["orders"].outputs) == {
        "orders.changes",
        "orders.rejected",
        "coupons.issued",
        "t-topo-balance-deltas",
    }
    assert pipe.dead_letter_topic == "orders.dlq" and topo.app.order_topics
    dedup_log = pipe.tables["dedup"].changelog_topic
    assert dedup_log.config["delete.retention.ms"] == str(24 * 3600 * 1000)


@pytest.mark.parametrize("stages", ["all", "dedup"])
def test_the_web_server_starts_with_the_dashboard_at_the_root(tmp_path: Path, stages: str) -> None:
    # PIPELINE_STAGES=dedup (bench) left "/" the last route: Faust's own index was then
    # refused by aiohttp, and the worker died at start.
    app = build(_settings(tmp_path, stages=stages)).app
    app.web.init_server()
    gets = [r.resource.canonical for r in app.web.web_app.router.routes() if r.method == "GET"]
    assert gets[0] == "/" and "/stats" in gets and "/metrics" in gets
    assert ("/orders/{order_id}" in gets) == (stages == "all")


def test_a_topic_prefix_is_refused_with_the_settings_that_name_the_topics(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="PIPELINE_TOPIC_RAW"):
        build(_settings(tmp_path, topic_prefix="staging."))
