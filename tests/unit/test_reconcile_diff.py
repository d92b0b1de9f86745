"""The comparison at the heart of ``reconcile``: it must catch every kind of fault."""

from __future__ import annotations

from pipeline.reconcile import TopicCheck, _diff_sequences

WANT = {"o1": ["e0", "e1", "e2"], "o2": ["e0"]}


def diff(got: dict[str, list[str]]) -> TopicCheck:
    check = TopicCheck("t")
    _diff_sequences(check, WANT, got)
    return check


def test_identical_outputs_pass() -> None:
    assert diff({"o1": ["e0", "e1", "e2"], "o2": ["e0"]}).ok


def test_a_duplicated_output_is_caught() -> None:
    check = diff({"o1": ["e0", "e1", "e1", "e2"], "o2": ["e0"]})
    assert (check.duplicates, check.missing, check.unexpected) == (1, 0, 0)
    assert not check.ok


def test_a_missing_output_is_caught() -> None:
    check = diff({"o1": ["e0", "e2"]})
    assert (check.duplicates, check.missing, check.unexpected) == (0, 2, 0)


def test_an_unexpected_output_is_caught() -> None:
    check = diff({"o1": ["e0", "e1", "e2"], "o2": ["e0"], "o3": ["x"]})
    assert (check.unexpected, check.missing) == (1, 0)


def test_per_order_order_is_checked() -> None:
    check = diff({"o1": ["e1", "e0", "e2"], "o2": ["e0"]})
    assert check.out_of_order == 1 and check.duplicates == check.missing == 0
    assert "out of order" in check.examples[0]
