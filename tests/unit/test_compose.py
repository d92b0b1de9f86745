"""docker-compose.yml stays valid and in step with .env.

``test_compose_config`` renders the file with ``docker compose config`` (or the
standalone ``docker-compose``) and checks the result; it is skipped only where no
compose command exists. ``test_compose_file_uses_env_kafka_version`` needs no Docker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_FILE = ROOT / ".env"
TIMEOUT_S = 60


def _dotenv(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def _kafka_version() -> str:
    version = _dotenv(ENV_FILE).get("KAFKA_VERSION", "")
    assert version, f"{ENV_FILE} sets no KAFKA_VERSION"
    return version


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    # Variables in our own environment would override .env (KAFKA_VERSION) or pick
    # other files and profiles (COMPOSE_*): render the file exactly as checked in.
    env = {
        k: v for k, v in os.environ.items() if k != "KAFKA_VERSION" and not k.startswith("COMPOSE_")
    }
    return subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _compose_command() -> list[str]:
    """The first compose that answers ``version``, or skip: ``docker`` without the
    compose plugin exits non-zero on ``docker compose version`` ("unknown command")."""
    tried = []
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            tried.append(f"{cmd[0]}: not installed")
            continue
        try:
            probe = _run([*cmd, "version"])
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{' '.join(cmd)} version: {exc}")
            continue
        if probe.returncode == 0:
            return cmd
        detail = (probe.stderr or probe.stdout).strip().splitlines()
        tried.append(f"{' '.join(cmd)} version: {detail[0] if detail else probe.returncode}")
    pytest.skip("no docker compose available (" + "; ".join(tried) + ")")


def _rendered_config(compose: list[str]) -> dict[str, Any]:
    base = [
        *compose,
        "--project-directory",
        str(ROOT),
        "-f",
        str(COMPOSE_FILE),
        "--profile",
        "demo",
        "--profile",
        "monitoring",
        "config",
    ]
    # Validation first, with flags every compose version has: from here on a failure
    # is the file's fault and fails the test.
    check = _run([*base, "--quiet"])
    assert check.returncode == 0, f"compose rejects docker-compose.yml:\n{check.stderr}"

    rendered = _run([*base, "--format", "json"])
    if rendered.returncode == 0:
        config: dict[str, Any] = json.loads(rendered.stdout)
        return config
    # Compose releases without --format json print YAML only.
    yaml = pytest.importorskip(
        "yaml",
        reason=f"{' '.join(compose)} config has no --format json and PyYAML "
        f"is not installed: {rendered.stderr.strip()}",
    )
    rendered = _run(base)
    assert rendered.returncode == 0, rendered.stderr
    config = yaml.safe_load(rendered.stdout)
    return config


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def _ports(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host_ip, published, target) of each port, from long or short syntax."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append(
                (
                    str(port.get("host_ip", "")),
                    str(port.get("published", "")),
                    str(port.get("target", "")),
                )
            )
        else:
            parts = str(port).split("/")[0].split(":")
            parts = [""] * (3 - len(parts)) + parts
            out.append((parts[0], parts[1], parts[2]))
    return out


def test_compose_config() -> None:
    config = _rendered_config(_compose_command())
    services = config["services"]
    kafka, worker, demo = services["kafka"], services["worker"], services["demo"]

    assert kafka["image"] == f"apache/kafka:{_kafka_version()}"

    # Each pipeline container bootstraps on the kafka service, on a listener that the
    # broker advertises under that name (so the metadata it gets back is reachable).
    advertised = _environment(kafka)["KAFKA_ADVERTISED_LISTENERS"].split(",")
    advertised_addrs = {urlsplit(a).netloc for a in advertised}
    for name, svc in (("worker", worker), ("demo", demo)):
        broker = urlsplit(_environment(svc)["PIPELINE_BROKER"])
        assert broker.scheme == "kafka", name
        assert broker.hostname == "kafka", f"{name} does not use the kafka service"
        assert broker.netloc in advertised_addrs, (
            f"{name} bootstraps on {broker.netloc}, not an advertised listener "
            f"{sorted(advertised_addrs)}"
        )
        assert "kafka" in svc.get("depends_on", {}), name

    assert worker["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert _environment(worker)["PIPELINE_WEB_HOST"] == "0.0.0.0"
    assert demo.get("profiles") == ["demo"]

    for name in ("prometheus", "grafana"):
        assert services[name].get("profiles") == ["monitoring"], name

    published = {name: _ports(svc) for name, svc in services.items() if svc.get("ports")}
    assert ("127.0.0.1", "9092", "9092") in published["kafka"]
    assert ("127.0.0.1", "6066", "6066") in published["worker"]
    for name, ports in published.items():
        for host_ip, port, _ in ports:
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"


def test_compose_file_uses_env_kafka_version() -> None:
    version = _kafka_version()
    # Comments may mention anything; only the YAML content counts.
    content = "\n".join(
        line.split(" #", 1)[0]
        for line in COMPOSE_FILE.read_text().splitlines()
        if not line.lstrip().startswith("#")
    )
    images = re.findall(r"^\s*image:\s*[\"']?(apache/kafka:\S+?)[\"']?\s*$", content, re.M)
    assert images == ["apache/kafka:${KAFKA_VERSION}"], images
    assert version not in content, f"docker-compose.yml repeats {version}; use .env"


def test_compose_bind_mounts_exist() -> None:
    # Prometheus and Grafana read their configuration from deploy/: a renamed file
    # must fail here, not as an empty dashboard after `up`.
    mounts = re.findall(r"^\s*- (\./[^:\s]+):", COMPOSE_FILE.read_text(), re.M)
    assert mounts, "no bind mounts found"
    for source in mounts:
        assert (ROOT / source).exists(), source
