"""``reconcile`` shares no decision code with the workers: a bug in an operator must
show up as a difference, not be replayed (issue 12, item 8)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pipeline.tools.reconcile

SOURCE = Path(pipeline.tools.reconcile.__file__)
#: the workers' deciding modules: the agents, the operators and the engine
DECIDING = (
    "pipeline.agents",
    "pipeline.domain.route",
    "pipeline.domain.dedup",
    "pipeline.domain.orders",
    "pipeline.eos",
)
#: what it may take from the workers' modules: schema limits, nothing that decides
ALLOWED = {
    "pipeline.domain.codecs": {"DLQ_KEY_MAX_BYTES", "DLQ_MAX_BYTES", "REASON_MAX_BYTES"},
    "pipeline.domain.models": {"MAX_AMOUNT", "MAX_ID_CHARS", "MAX_TS_MS", "MAX_VALUE_BYTES"},
    # how to connect (TLS, SASL): no decision
    "pipeline.connection": {"KafkaConnection"},
    "pipeline.kafka_io": {"Msg", "end_offsets", "read_topic"},
    "pipeline.settings": {"Settings"},
}


def test_imports_only_constants_from_the_pipeline() -> None:
    tree = ast.parse(SOURCE.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] != "pipeline", alias.name
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith(DECIDING):
                raise AssertionError(f"imports {module}")
            if module.startswith("pipeline"):
                names = {a.name for a in node.names}
                assert names <= ALLOWED.get(module, set()), (module, names)


def test_loading_it_loads_no_operator() -> None:
    code = (
        "import sys, pipeline.tools.reconcile; "
        f"print(sorted(m for m in sys.modules if m.startswith({(*DECIDING, 'faust')!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=SOURCE.parents[2],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]", out.stdout
