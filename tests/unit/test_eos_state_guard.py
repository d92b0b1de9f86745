"""A source partition is never processed without its tables' changelog partitions
actively assigned (else its state would be neither restored nor kept)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from faust.types import TP

from pipeline.eos import ExactlyOnceTransactionManager
from pipeline.eos.faust import transactions as eos


class Fatal(Exception):
    pass


def _manager(standbys: set[TP]) -> SimpleNamespace:
    store = SimpleNamespace(changelog_topic_name="app-users.balances-changelog")
    return SimpleNamespace(
        app=SimpleNamespace(assignor=SimpleNamespace(is_standby=lambda tp: tp in standbys)),
        coordinator=SimpleNamespace(stores={"deltas": [store]}),
    )


@pytest.fixture(autouse=True)
def _fatal_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def fatal(message: str, exc: BaseException | None = None) -> None:
        raise Fatal(message)

    monkeypatch.setattr(eos, "fatal", fatal)


def check(manager: SimpleNamespace, keep: set[TP], assigned: set[TP]) -> None:
    ExactlyOnceTransactionManager._check_state_assigned(manager, keep, assigned)  # type: ignore[arg-type]


def test_source_with_its_changelog_passes() -> None:
    src, log = TP("deltas", 3), TP("app-users.balances-changelog", 3)
    check(_manager(set()), {src}, {src, log})


def test_missing_changelog_partition_ends_the_process() -> None:
    src = TP("deltas", 3)
    other = TP("app-users.balances-changelog", 4)
    with pytest.raises(Fatal, match="without its table state"):
        check(_manager(set()), {src}, {src, other})


def test_changelog_only_as_standby_ends_the_process() -> None:
    src, log = TP("deltas", 3), TP("app-users.balances-changelog", 3)
    with pytest.raises(Fatal):
        check(_manager({log}), {src}, {src, log})


def test_sources_without_tables_need_nothing() -> None:
    check(_manager(set()), {TP("raw", 0)}, {TP("raw", 0)})
