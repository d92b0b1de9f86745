"""Summarise the JUnit XML reports of repeated test runs (``scripts/test --repeat N``).

Prints every test that failed or errored in at least one run, with the runs it failed
in and the first line of its first failure; exits 1 if there is one, 0 otherwise.
Standard library only: it runs before and without the project's environment.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def summarise(reports: list[Path]) -> int:
    failed: dict[str, list[int]] = defaultdict(list)
    first_line: dict[str, str] = {}
    runs_total: list[int] = []
    for run, report in enumerate(reports, start=1):
        if not report.exists():
            # pytest wrote no report: it did not start (collection or setup failed)
            failed["<the whole run: no report written>"].append(run)
            runs_total.append(0)
            continue
        root = ET.parse(report).getroot()
        cases = list(root.iter("testcase"))
        runs_total.append(len(cases))
        for case in cases:
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
            if bad is None:
                continue
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            failed[name].append(run)
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            first_line.setdefault(name, message[0][:160] if message else "")
    print(f"{len(reports)} runs; tests per run: {', '.join(map(str, runs_total))}")
    if not failed:
        print("no test failed in any run")
        return 0
    print(f"{len(failed)} tests failed at least once:")
    for name, runs in sorted(failed.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        print(f"  {len(runs)}/{len(reports)}  {name}  (runs {', '.join(map(str, runs))})")
        if first_line.get(name):
            print(f"         {first_line[name]}")
    return 1


if __name__ == "__main__":
    sys.exit(summarise([Path(p) for p in sys.argv[1:]]))
