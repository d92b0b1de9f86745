"""deploy/alerts.yml: valid rules, each alert unit-tested by promtool, and every metric
they use is one the workers (or reconcile's metrics file) really export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.metrics import registry_for, render

from .test_metrics import _app

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool missing: scripts/setup installs Debian's prometheus package")
    return tool


def test_rules_are_valid() -> None:
    done = subprocess.run(
        [_promtool(), "check", "rules", str(DEPLOY / "alerts.yml")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_fires_when_it_should_and_only_then() -> None:
    done = subprocess.run(
        [_promtool(), "test", "rules", "alerts_test.yml"],
        cwd=DEPLOY,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Every alert has a test case.
    alerts = set(re.findall(r"- alert: (\w+)", (DEPLOY / "alerts.yml").read_text()))
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "alerts_test.yml").read_text()))
    assert alerts and alerts == tested


def test_prometheus_config_is_valid() -> None:
    # Also loads and checks the rule files it names (alerts.yml).
    done = subprocess.run(
        [_promtool(), "check", "config", str(DEPLOY / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _exported(tmp_path: Path) -> set[str]:
    from pipeline.tools.reconcile import Report, write_metrics

    exported = set()
    for line in render(registry_for(_app())).decode().splitlines():  # type: ignore[arg-type]
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            exported.add(name)
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
            exported.update(name + s for s in suffixes.get(kind, []))
    textfile = tmp_path / "reconcile.prom"
    write_metrics(Report(), str(textfile))
    from pipeline.tools.reconcile_db import DbReport, write_db_metrics

    write_db_metrics(DbReport("sqlite://"), str(textfile), append=True)
    exported.update(
        line.split()[2] for line in textfile.read_text().splitlines() if line.startswith("# TYPE")
    )
    return exported


def _names(text: str) -> set[str]:
    return set(re.findall(r"\b((?:pipeline|process)_[a-z_]+)\b", text))


def test_rules_only_use_metrics_that_exist(tmp_path: Path) -> None:
    rules = (DEPLOY / "alerts.yml").read_text()
    used = _names(rules)
    assert used, rules
    assert used <= _exported(tmp_path), sorted(used - _exported(tmp_path))


def test_grafana_dashboard_queries_exist(tmp_path: Path) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "pipeline.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    used = set().union(*(_names(e) for e in exprs))
    assert used <= _exported(tmp_path), sorted(used - _exported(tmp_path))
    # Recording rules it plots are defined in alerts.yml.
    rules = (DEPLOY / "alerts.yml").read_text()
    for expr in exprs:
        for rule in re.findall(r"pipeline:[\w:]+", expr):
            assert f"record: {rule}" in rules, rule
