"""The per-order comparison at the heart of ``reconcile``: it must catch every kind of
fault, and tell them apart."""

from __future__ import annotations

from pipeline.tools.reconcile import Item, Sequences, TopicCheck, same_json

WANT = {"o1": [("e0", b"a"), ("e1", b"b"), ("e2", b"c")], "o2": [("e0", b"x")]}


def diff(got: dict[str, list[Item]]) -> TopicCheck:
    seqs = Sequences()
    for order, items in WANT.items():
        for item in items:
            seqs.expect(order, item)
    # Interleaved across orders, as records of several partitions arrive.
    longest = max((len(v) for v in got.values()), default=0)
    for i in range(longest):
        for order, items in got.items():
            if i < len(items):
                seqs.actual(order, items[i])
    check = TopicCheck("t", expected=seqs.expected)
    seqs.diff(check)
    return check


def counts(check: TopicCheck) -> tuple[int, int, int, int, int]:
    return (
        check.duplicates,
        check.missing,
        check.unexpected,
        check.mismatched,
        check.out_of_order,
    )


def test_identical_outputs_pass() -> None:
    check = diff({"o1": [("e0", b"a"), ("e1", b"b"), ("e2", b"c")], "o2": [("e0", b"x")]})
    assert check.ok and check.expected == 4 and not check.examples


def test_a_duplicated_output_is_caught() -> None:
    check = diff(
        {"o1": [("e0", b"a"), ("e1", b"b"), ("e1", b"b"), ("e2", b"c")], "o2": [("e0", b"x")]}
    )
    assert counts(check) == (1, 0, 0, 0, 0)
    assert not check.ok


def test_a_missing_output_is_caught() -> None:
    check = diff({"o1": [("e0", b"a"), ("e2", b"c")]})
    assert counts(check) == (0, 2, 0, 0, 0)


def test_an_unexpected_output_is_caught() -> None:
    check = diff(
        {
            "o1": [("e0", b"a"), ("e1", b"b"), ("e2", b"c")],
            "o2": [("e0", b"x")],
            "o3": [("x", b"y")],
        }
    )
    assert counts(check) == (0, 0, 1, 0, 0)


def test_a_wrong_record_is_a_mismatch_not_a_loss_and_an_extra() -> None:
    check = diff({"o1": [("e0", b"a"), ("e1", b"B"), ("e2", b"c")], "o2": [("e0", b"x")]})
    assert counts(check) == (0, 0, 0, 1, 0)
    assert "expected" in check.examples[0]


def test_per_order_order_is_checked() -> None:
    check = diff({"o1": [("e1", b"b"), ("e0", b"a"), ("e2", b"c")], "o2": [("e0", b"x")]})
    assert counts(check) == (0, 0, 0, 0, 1)
    assert "out of order" in check.examples[0]


def test_a_fault_after_a_matching_prefix_is_caught() -> None:
    check = diff({"o1": [("e0", b"a"), ("e1", b"b")], "o2": [("e0", b"x"), ("e0", b"x")]})
    assert counts(check) == (1, 1, 0, 0, 0)


def test_table_values_compare_with_their_json_types() -> None:
    assert same_json({"a": 1, "b": [1, "x"]}, {"a": 1, "b": [1, "x"]})
    # A balance decoded as a float (as orjson does beyond 64 bits) is not the integer.
    assert not same_json({"balance_cents": 2.0**64}, {"balance_cents": 2**64})
    assert not same_json({"a": True}, {"a": 1})
    assert not same_json({"a": 1}, {"a": 1, "b": 2})
