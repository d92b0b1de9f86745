"""The worker's collector policy (pipeline.eos.collector), each case in a fresh
interpreter: freezing pytest's own objects would change every test after it."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json, sys
{before}
from pipeline.eos.collector import GEN0_THRESHOLD, settle
settle()
print(json.dumps({{"frozen": gc.get_freeze_count(), "threshold": gc.get_threshold(),
                  "enabled": gc.isenabled(), "gen0": GEN0_THRESHOLD}}))
"""


def _run(before: str = "") -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_settle_freezes_what_is_alive_and_spaces_young_collections_out() -> None:
    out = _run()
    assert isinstance(out["frozen"], int) and out["frozen"] > 1000
    assert out["threshold"] == [out["gen0"], 10, 10]


def test_a_higher_threshold_of_the_users_is_kept() -> None:
    out = _run("gc.set_threshold(123456, 7, 9)")
    assert out["threshold"] == [123456, 7, 9]


def test_a_collector_turned_off_stays_off_and_nothing_is_frozen() -> None:
    out = _run("gc.disable()")
    assert out == {**out, "frozen": 0, "enabled": False, "threshold": [700, 10, 10]}
