"""Every Kafka client the project makes connects as the settings say (TLS, SASL): none is
built from a bare bootstrap string (issue 17).

The sources of ``pipeline/``, ``examples/`` and the Python inside ``scripts/`` are parsed
(never imported) and each aiokafka client construction and each call of a helper that
takes the connection is checked. The checker is tested on planted snippets first, so
that a checker that finds nothing cannot pass for a clean tree.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: aiokafka's clients: each must be given ``**<connection>.kwargs()``
CLIENTS = frozenset(
    {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient", "AIOKafkaClient"}
)
#: what only the connection may set
CONNECTION_ARGS = frozenset(
    {
        "bootstrap_servers",
        "security_protocol",
        "ssl_context",
        "sasl_mechanism",
        "sasl_plain_username",
        "sasl_plain_password",
    }
)
#: the project's helpers whose first argument is the connection (pipeline.kafka_io,
#: pipeline.admin, pipeline.tools.*)
HELPERS = frozenset(
    {
        "produce",
        "end_offsets",
        "read_topic",
        "committed_offsets",
        "record_ends",
        "ensure_topics",
        "drop_topics",
        "open_transactions",
        "latency",
        "_workload",
        "_read",
    }
)
#: (file, enclosing function) of client constructions that get their connection
#: otherwise, with the reason
ALLOWED = {
    # Faust's producer settings, ``_settings_auth()`` included: the credentials
    # create_app gives Faust (tests/unit/test_connection.py checks they arrive).
    ("pipeline/eos/faust/producer.py", "like_faust"),
}
#: where a bare ``bootstrap_servers`` may be read: where it is defined and turned into
#: the connection
DEFINING = frozenset({"pipeline/settings.py", "pipeline/connection.py"})


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _is_connection_kwargs(value: ast.expr) -> bool:
    """``<anything>.kwargs()``: the connection's keyword arguments."""
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr == "kwargs"
        and not value.args
    )


def _bare_bootstrap(node: ast.expr) -> bool:
    """A literal host list, or a settings' bare ``bootstrap_servers``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return True
    if isinstance(node, ast.JoinedStr):
        return True
    return isinstance(node, ast.Attribute) and node.attr == "bootstrap_servers"


def connection_problems(
    source: str, path: str = "<snippet>", allowed: frozenset[tuple[str, str]] = frozenset()
) -> list[str]:
    """What in ``source`` makes a Kafka client without the connection, one line each."""
    tree = ast.parse(source)
    problems: list[str] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.Call):
            name = _name(node.func)
            where = f"{path}:{node.lineno}"
            if name in CLIENTS and (path, function) not in allowed:
                if not any(
                    kw.arg is None and _is_connection_kwargs(kw.value) for kw in node.keywords
                ):
                    problems.append(f"{where}: {name}(...) without **<connection>.kwargs()")
                own = sorted(kw.arg for kw in node.keywords if kw.arg in CONNECTION_ARGS)
                if own:
                    problems.append(f"{where}: {name}(...) sets {', '.join(own)} itself")
            if name in HELPERS and node.args and _bare_bootstrap(node.args[0]):
                problems.append(f"{where}: {name}(...) given a bare bootstrap string")
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "bootstrap_servers"
            and path not in DEFINING
        ):
            problems.append(
                f"{path}:{node.lineno}: .bootstrap_servers read (no TLS, no SASL): "
                "use <settings>.kafka"
            )
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "")
    return problems


#: Python inside a shell script: ``python -c "..."`` and ``python - <<'TAG' ... TAG``
_INLINE = re.compile(r"""python3?\b[^\n"]*?\s-c\s+"((?:[^"\\]|\\.)*)\"""", re.S)
_HEREDOC = re.compile(r"python3?\b[^\n]*<<-?\s*'?(\w+)'?\n(.*?)\n\s*\1\s*\n", re.S)


def embedded_python(script: str) -> list[str]:
    snippets = [m.group(1) for m in _INLINE.finditer(script)]
    snippets += [m.group(2) for m in _HEREDOC.finditer(script)]
    return snippets


def sources() -> list[tuple[str, str]]:
    """(path, Python source) of everything checked."""
    out = []
    for top in ("pipeline", "examples", "scripts"):
        for file in sorted((ROOT / top).rglob("*.py")):
            out.append((file.relative_to(ROOT).as_posix(), file.read_text()))
    for file in sorted((ROOT / "scripts").iterdir()):
        if file.is_file() and file.suffix == "" and file.read_text().startswith("#!"):
            text = file.read_text()
            for i, snippet in enumerate(embedded_python(text)):
                out.append((f"{file.relative_to(ROOT).as_posix()}#python{i}", snippet))
    return out


# -- the checker catches what it must -----------------------------------------------


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "p = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks='all')",
            [
                "without **<connection>.kwargs()",
                "sets bootstrap_servers itself",
                ".bootstrap_servers read",
            ],
        ),
        (
            "c = aiokafka.AIOKafkaConsumer('t', bootstrap_servers='h:9092')",
            ["without", "sets bootstrap_servers itself"],
        ),
        ("a = AIOKafkaAdminClient(**config, request_timeout_ms=1)", ["without"]),
        (
            "c = AIOKafkaConsumer(**kafka.kwargs(), security_protocol='PLAINTEXT')",
            ["sets security_protocol itself"],
        ),
        ("await ensure_topics('127.0.0.1:9092', ['t'], 8)", ["given a bare bootstrap string"]),
        (
            "await drop_topics(s.bootstrap_servers, tag)",
            ["given a bare bootstrap", ".bootstrap_servers"],
        ),
        ("async for m in read_topic(f'{host}:9092', t): pass", ["given a bare bootstrap string"]),
        ("hosts = settings.bootstrap_servers", [".bootstrap_servers read"]),
    ],
)
def test_the_checker_finds_a_client_without_the_connection(
    snippet: str, expected: list[str]
) -> None:
    problems = connection_problems(snippet)
    assert len(problems) == len(expected), problems
    for problem, words in zip(problems, expected, strict=True):
        assert words in problem, (problem, words)


@pytest.mark.parametrize(
    "snippet",
    [
        "p = AIOKafkaProducer(**settings.kafka.kwargs(), enable_idempotence=True)",
        "c = AIOKafkaConsumer('t', **self.kafka.kwargs(), group_id=None)",
        "a = AIOKafkaAdminClient(**as_connection(kafka).kwargs(), request_timeout_ms=1)",
        "await ensure_topics(s.kafka, ['t'], 8)",
        "async for m in read_topic(kafka, t): pass",
        "await self.produce(records, 5.0)",
    ],
)
def test_the_checker_passes_a_client_with_the_connection(snippet: str) -> None:
    assert connection_problems(snippet) == []


def test_an_allowed_construction_is_allowed_only_where_named() -> None:
    snippet = "def like_faust(p):\n    return AIOKafkaProducer(**settings, transactional_id='t')\n"
    allowed = frozenset({("x.py", "like_faust")})
    assert connection_problems(snippet, "x.py", allowed) == []
    assert connection_problems(snippet, "y.py", allowed) != []


def test_python_inside_a_shell_script_is_found() -> None:
    script = (
        "#!/usr/bin/env bash\n"
        '.venv/bin/python -c "\n'
        "import asyncio\n"
        "print(asyncio.run(drop_topics(s.bootstrap_servers, s.app_id)))\n"
        '"\n'
        ".venv/bin/python - \"$port\" <<'PY'\n"
        "AIOKafkaProducer(bootstrap_servers='h')\n"
        "PY\n"
    )
    snippets = embedded_python(script)
    assert len(snippets) == 2
    problems = [p for s in snippets for p in connection_problems(s)]
    assert any("drop_topics" in p for p in problems)
    assert any("AIOKafkaProducer" in p for p in problems)


# -- the tree ------------------------------------------------------------------------


def test_the_sources_checked_include_every_place_that_makes_clients() -> None:
    names = {path for path, _ in sources()}
    for must in (
        "pipeline/kafka_io.py",
        "pipeline/admin.py",
        "pipeline/factory.py",
        "pipeline/edges/sink.py",
        "pipeline/edges/outbox.py",
        "pipeline/eos/coordinator.py",
        "pipeline/tools/bench.py",
        "pipeline/tools/bench_raw.py",
        "pipeline/tools/chaos.py",
        "pipeline/tools/reference.py",
        "pipeline/__main__.py",
        "scripts/reconcile-scale#python0",
        "examples/payments/app.py",
    ):
        assert must in names, must
    scale = dict(sources())["scripts/reconcile-scale#python0"]
    assert "drop_topics" in scale


def test_every_kafka_client_gets_the_connection() -> None:
    problems = [
        problem
        for path, source in sources()
        for problem in connection_problems(source, path, frozenset(ALLOWED))
    ]
    assert problems == [], "\n".join(problems)


def test_the_allowed_constructions_still_exist() -> None:
    # An allowance whose code moved would silently allow nothing; one whose code is
    # gone should go too.
    for path, function in ALLOWED:
        tree = ast.parse((ROOT / path).read_text())
        names = {
            n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        assert function in names, (path, function)
