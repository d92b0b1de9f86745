"""Every code block of the README and of ``docs/`` is checked, so that the docs cannot
drift from the code (issue 14):

* ``python``: an excerpt of a file a test runs (named in the fence, as in
  ```` ```python examples/payments/app.py ````): its lines appear in that file, in order
  (``...`` stands for lines left out, as does a body ``: ...``), and the file
  compiles;
* ``sh`` / ``bash``: commands. ``python -m pipeline ...`` must parse with the CLI's own
  parser (the subcommand and every option exist), ``faust -A MODULE`` must name an
  importable module, ``scripts/X`` must be an executable script of the repository; a few
  outside tools (a venv, pip) are let through by name;
* ``text``: diagrams, layouts and output, not run.

A block without one of these labels fails: nothing in the docs escapes the check.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from pipeline.__main__ import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)(?:[ \t]+(\S+))?[ \t]*$")
#: outside tools the docs may name, which this check does not run
OUTSIDE = {"python3.11", "pip", "docker", "kafka-configs.sh", "curl"}


def blocks() -> list[tuple[str, int, str, str | None, list[str]]]:
    """(document, line, label, named file, lines) of every fenced block."""
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if m is None:
                i += 1
                continue
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            found.append((doc.name, start, m.group(1), m.group(2), body))
            i += 1
    return found


BLOCKS = blocks()


def _commands(body: list[str]) -> list[str]:
    joined: list[str] = []
    carry = ""
    for line in body:
        line = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            carry += line[:-1] + " "
            continue
        line = (carry + line).strip()
        carry = ""
        if line:
            joined.append(line)
    return joined


def _check_command(command: str) -> None:
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        words = words[1:]  # VAR=value before the command
    assert words, command
    head = words[0]
    if head.endswith("/python") or head in ("python", "python3"):
        if words[1:3] == ["-m", "pipeline"]:
            args = words[3:]
            try:
                build_parser().parse_args(args)
            except SystemExit as exc:
                raise AssertionError(f"the CLI refuses {command!r}") from exc
            return
        if words[1:3] == ["-m", "venv"]:
            return
    if head == "faust":
        module = words[words.index("-A") + 1]
        assert importlib.util.find_spec(module) is not None, f"no module {module}: {command!r}"
        return
    if head.startswith("scripts/"):
        script = ROOT / head
        assert script.is_file() and script.stat().st_mode & 0o111, f"no script {head}"
        return
    name = head.rsplit("/", 1)[-1]
    assert name in OUTSIDE, f"a command this check does not know: {command!r}"


def _find(lines: list[str], wanted: str, start: int) -> int:
    """The line after the first one from ``start`` that is ``wanted``, give or take
    leading indentation (an excerpt of code nested in a function is shown dedented, as
    ruff formats it); 0 when there is none."""
    for i in range(start, len(lines)):
        text = lines[i]
        if text.endswith(wanted) and not text[: len(text) - len(wanted)].strip():
            return i + 1
    return 0


@pytest.mark.parametrize(
    ("doc", "line", "label", "named", "body"),
    BLOCKS,
    ids=[f"{b[0]}:{b[1]}" for b in BLOCKS],
)
def test_each_code_block_is_checked(
    doc: str, line: int, label: str, named: str | None, body: list[str]
) -> None:
    if label == "text":
        return
    if label == "python":
        assert named, f"{doc}:{line}: a python block names the file it is an excerpt of"
        source = (ROOT / named).read_text()
        compile(source, named, "exec")
        lines = [s.rstrip() for s in source.splitlines()]
        at = 0
        for wanted in body:
            if wanted.strip() in ("", "...", "# ..."):
                continue
            if wanted.endswith(": ..."):  # a body left out: "def f(...) -> T: ..."
                wanted = wanted[: -len(" ...")]
            at = _find(lines, wanted.rstrip(), at)
            assert at, f"{doc}:{line}: not in {named} (in order): {wanted!r}"
        return
    if label in ("sh", "bash"):
        for command in _commands(body):
            _check_command(command)
        return
    raise AssertionError(f"{doc}:{line}: label the block python, sh, bash or text")


def test_the_check_fails_on_a_command_that_is_not_there() -> None:
    with pytest.raises(AssertionError, match="the CLI refuses"):
        _check_command("python -m pipeline reconcile --no-such-flag")
    with pytest.raises(AssertionError, match="no script"):
        _check_command("scripts/no-such-script start")
    with pytest.raises(AssertionError, match="no module"):
        _check_command("faust -A examples.nowhere worker")
    assert len(BLOCKS) >= 10


def test_an_excerpt_matches_whole_lines_in_order_give_or_take_indentation() -> None:
    lines = ["def f() -> int:", "    x = 1", "    return x"]
    assert _find(lines, "x = 1", 0) == 2  # shown dedented
    assert _find(lines, "return x", 2) == 3
    assert _find(lines, "x = 1", 2) == 0  # not after where the excerpt is
    assert _find(lines, "= 1", 0) == 0  # part of a line is no line
