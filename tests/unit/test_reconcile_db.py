"""``reconcile --db``'s pure comparisons: given what the records say and what the rows
hold, every difference, by table, key and kind; lag kept apart from differences."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

import pipeline.tools.reconcile_db
from pipeline.__main__ import build_parser
from pipeline.tools.reconcile_db import (
    Change,
    Coupon,
    Cut,
    DbReport,
    Difference,
    Expected,
    OrderRow,
    TableCheck,
    compare_coupons,
    compare_orders,
    compare_outbox,
    parse_change,
    parse_coupon,
    record_digest,
    write_db_metrics,
)


def change(order: str, v: int, to: str = "PAID", frm: str = "CREATED", **kw: object) -> bytes:
    doc: dict[str, object] = {
        "event_id": f"{order}-e{v}",
        "order_id": order,
        "from": frm,
        "to": to,
        "version": v,
        "ts_ms": 1000 + v,
    }
    doc.update(kw)
    return orjson.dumps(doc)


def kinds(diffs: list[Difference]) -> list[tuple[str, str]]:
    return sorted((d.key, d.kind) for d in diffs)


# -- parsing ------------------------------------------------------------------------------


def test_a_change_is_read_by_the_contracts_fields() -> None:
    assert parse_change(change("o1", 2)) == Change("o1", "PAID", 2, 1002, "o1-e2")


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "not a JSON object"),
        (change("o1", 2, version=True), "'version' is not an integer"),
        (change("o1", 0), "version 0 < 1"),
        (change("o1", 2, to="LOST"), "unknown status"),
        (change("o1", 2, order_id=""), "'order_id'"),
        (None, "not JSON"),
    ],
)
def test_a_record_that_is_no_change_says_why(value: bytes | None, why: str) -> None:
    got = parse_change(value)
    assert isinstance(got, str) and why in got, got


def test_a_coupon_is_read_by_the_contracts_fields() -> None:
    doc = {"coupon_id": "c1", "order_id": "o1", "user_id": "u1", "amount_cents": 2**63 - 1}
    assert parse_coupon(orjson.dumps(doc)) == Coupon("c1", "o1", "u1", 2**63 - 1)
    assert isinstance(parse_coupon(orjson.dumps({**doc, "amount_cents": "5"})), str)


# -- what the tables must hold --------------------------------------------------------------


def test_the_last_change_by_version_wins_whatever_the_reading_order() -> None:
    e = Expected()
    for v in (1, 3, 2):
        got = parse_change(change("o1", v, to={1: "CREATED", 2: "PAID", 3: "SHIPPED"}[v]))
        assert isinstance(got, Change)
        e.add_change(got)
    assert e.orders["o1"].version == 3 and e.orders["o1"].status == "SHIPPED"
    assert not e.faults


def test_two_different_changes_at_one_version_are_a_conflict_the_same_twice_is_not() -> None:
    e = Expected()
    a = Change("o1", "PAID", 2, 5, "e2")
    e.add_change(a)
    e.add_change(a)
    assert not e.faults
    e.add_change(a._replace(status="CANCELLED"))
    assert kinds(e.faults) == [("o1", "conflict")]
    c = Coupon("c1", "o1", "u1", 10)
    e.add_coupon(c)
    e.add_coupon(c)
    e.add_coupon(c._replace(amount_cents=11))
    assert kinds(e.faults) == [("c1", "conflict"), ("o1", "conflict")]


# -- orders -------------------------------------------------------------------------------


def test_orders_every_kind_of_difference_by_key() -> None:
    want = {
        "same": Change("same", "PAID", 2, 10, "e-same"),
        "gone": Change("gone", "CREATED", 1, 11, "e-gone"),
        "old": Change("old", "SHIPPED", 3, 12, "e-old"),
        "new": Change("new", "CREATED", 1, 13, "e-new"),
        "odd": Change("odd", "PAID", 2, 14, "e-odd"),
    }
    rows = [
        OrderRow("same", "PAID", 2, 10, "e-same"),
        OrderRow("old", "PAID", 2, 9, "e-old-2"),
        OrderRow("new", "PAID", 2, 20, "e-x"),
        OrderRow("odd", "CANCELLED", 2, 14, "e-other"),
        OrderRow("stray", "CREATED", 1, 1, "e-stray"),
    ]
    diffs = list(compare_orders(want, rows))
    assert kinds(diffs) == [
        ("gone", "missing"),
        ("new", "ahead"),
        ("odd", "mismatched"),
        ("old", "stale"),
        ("stray", "extra"),
    ]
    odd = next(d for d in diffs if d.key == "odd")
    assert "status CANCELLED != PAID" in odd.detail and "event_id e-other != e-odd" in odd.detail
    assert "updated_ms" not in odd.detail
    assert want == {}, "matched and missing keys leave memory"


def test_orders_equal_tables_have_no_difference() -> None:
    want = {"o1": Change("o1", "PAID", 2, 10, "e")}
    assert list(compare_orders(want, [OrderRow("o1", "PAID", 2, 10, "e")])) == []


def test_orders_updated_ms_alone_is_a_mismatch() -> None:
    want = {"o1": Change("o1", "PAID", 2, 10, "e")}
    diffs = list(compare_orders(want, [OrderRow("o1", "PAID", 2, 11, "e")]))
    assert kinds(diffs) == [("o1", "mismatched")]
    assert "updated_ms 11 != 10" in diffs[0].detail


# -- coupons ------------------------------------------------------------------------------


def test_coupons_every_kind_of_difference_by_key() -> None:
    want = {
        "c1": Coupon("c1", "o1", "u1", 100),
        "c2": Coupon("c2", "o2", "u2", 200),
        "c3": Coupon("c3", "o3", "u3", 300),
    }
    rows = [
        Coupon("c1", "o1", "u1", 100),
        Coupon("c3", "o3", "u3", 301),
        Coupon("c9", "o9", "u9", 900),
    ]
    diffs = list(compare_coupons(want, rows))
    assert kinds(diffs) == [("c2", "missing"), ("c3", "mismatched"), ("c9", "extra")]
    assert "amount_cents 301 != 300" in next(d.detail for d in diffs if d.key == "c3")


# -- outbox -------------------------------------------------------------------------------


def test_outbox_a_published_row_is_found_by_event_id_and_exact_bytes() -> None:
    v1 = orjson.dumps({"event_id": "e1", "order_id": "o1"})
    v2 = orjson.dumps({"event_id": "e2", "order_id": "o2"})
    v3 = orjson.dumps({"event_id": "e3", "order_id": "o3"})
    published = {
        "e1": record_digest(b"o1", v1),
        "e2": record_digest(b"o2", v2),
        "e3": record_digest(b"o3", v3),
    }
    records = [
        (b"o1", v1),
        (b"o1", v1),  # published twice by a relay that crashed before marking: fine
        (b"o2", orjson.dumps({"event_id": "e2", "order_id": "o2", "x": 1})),  # other bytes
        (None, b"not json"),
        (b"o9", orjson.dumps({"event_id": "e9"})),  # another producer's record
    ]
    diffs = compare_outbox(published, records)
    assert kinds(diffs) == [("e2", "altered"), ("e3", "absent")]
    # The caller's mapping is left as it was.
    assert set(published) == {"e1", "e2", "e3"}


def test_outbox_the_key_counts() -> None:
    v = orjson.dumps({"event_id": "e1"})
    assert kinds(compare_outbox({"e1": record_digest(b"o1", v)}, [(None, v)])) == [
        ("e1", "altered")
    ]
    assert record_digest(None, b"x") != record_digest(b"", b"x")
    assert record_digest(b"a", b"bc") != record_digest(b"ab", b"c")
    assert compare_outbox({"e1": record_digest(b"o1", v)}, [(b"o1", v)]) == []


# -- the sink's offsets and lag -----------------------------------------------------------


def test_records_below_the_stored_offset_are_compared_the_rest_is_lag() -> None:
    cut = Cut("t", {0: 2}, {0: 5, 1: 3})
    seen = [(p, o, cut.consumed(p, o)) for p, o in [(0, 0), (0, 1), (0, 2), (0, 4), (1, 0)]]
    assert [x[2] for x in seen] == [True, True, False, False, False]
    assert cut.lag == {0: 2, 1: 1}
    assert list(cut.past_end()) == []


def test_a_stored_offset_past_the_end_or_on_no_partition_is_a_difference() -> None:
    cut = Cut("t", {0: 6, 1: 3, 7: 1}, {0: 5, 1: 3})
    assert kinds(list(cut.past_end())) == [("t[0]", "past-end"), ("t[7]", "past-end")]


# -- the report ---------------------------------------------------------------------------


def _report() -> DbReport:
    r = DbReport("sqlite:///x.db")
    c = TableCheck("orders", "orders.changes", ("missing", "extra"), show=2)
    r.checks.append(c)
    return r


def test_the_report_counts_every_difference_lists_the_first_and_keeps_lag_apart() -> None:
    r = _report()
    r.lag.sink["orders.changes"] = {0: 4, 1: 0}
    r.lag.outbox_pending = 3
    assert r.ok
    assert "verdict (database): PASS (0 differences)" in r.render()
    for i in range(3):
        r.checks[0].add(Difference("orders", f"o{i}", "missing", "no row"))
    text = r.render()
    assert not r.ok and r.differences == 3
    assert "missing 3  extra 0" in text
    assert "e.g. orders o0: missing: no row" in text and "o2" not in text
    assert "... and 1 more" in text
    assert "sink 4 records behind on orders.changes ([0] 4)" in text
    assert "outbox 3 rows not yet published" in text
    assert text.endswith("verdict (database): FAIL (3 differences)")
    doc = r.as_dict()
    assert doc["verdict"] == "FAIL" and doc["tables"][0]["missing"] == 3
    assert doc["lag"]["sink_records"] == 4 and doc["lag"]["outbox_pending"] == 3


def test_keys_are_shown_printable_and_bounded() -> None:
    d = Difference("orders", "a\x00b" + "x" * 200, "missing", "no row")
    shown = str(d)
    assert "\x00" not in shown and "\\x00" in shown and len(shown) < 150


def test_metrics_follow_the_kafka_gauges_in_one_file(tmp_path: Path) -> None:
    path = tmp_path / "r.prom"
    path.write_text("pipeline_reconcile_ok 1.0\n")
    r = _report()
    r.checks[0].add(Difference("orders", "o1", "extra", "row"))
    write_db_metrics(r, str(path), append=True)
    text = path.read_text()
    assert text.startswith("pipeline_reconcile_ok 1.0\n")
    assert "pipeline_reconcile_db_ok 0.0" in text
    assert 'pipeline_reconcile_db_differences{table="orders"} 1.0' in text
    write_db_metrics(r, str(path))
    assert "pipeline_reconcile_ok" not in path.read_text()


# -- the command and the module's independence ---------------------------------------------


def test_the_cli_takes_db_and_db_only() -> None:
    args = build_parser().parse_args(["reconcile", "--db", "x.db", "--db-only", "--db-show", "0"])
    assert (args.db, args.db_only, args.db_show) == ("x.db", True, 0)


def test_db_only_without_db_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before any Kafka or database access: the preflight is never reached.
    from pipeline.__main__ import _reconcile

    args = build_parser().parse_args(["reconcile", "--db-only"])
    assert _reconcile(args, None) == 2  # type: ignore[arg-type]
    assert "--db-only needs --db" in capsys.readouterr().err
    args = build_parser().parse_args(["reconcile", "--db", "x", "--pipeline", "m"])
    assert _reconcile(args, None) == 2  # type: ignore[arg-type]
    assert "takes no --pipeline" in capsys.readouterr().err


SOURCE = Path(pipeline.tools.reconcile_db.__file__)
#: what it may take from the pipeline: the tables' declarations and URL handling,
#: plain Kafka reading, settings; never the sink's or the relay's decisions
ALLOWED = {
    "pipeline.edges": {"db"},
    "pipeline.kafka_io": {"Msg", "end_offsets", "read_topic"},
    "pipeline.settings": {"Settings"},
}


def test_it_shares_no_decision_code_with_the_sink_or_the_relay() -> None:
    tree = ast.parse(SOURCE.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] != "pipeline", alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
            names = {a.name for a in node.names}
            assert names <= ALLOWED.get(node.module or "", set()), (node.module, names)


def test_loading_it_loads_neither_the_sink_nor_the_relay() -> None:
    code = (
        "import sys, pipeline.tools.reconcile_db; "
        "print(sorted(m for m in sys.modules if m.startswith("
        "('pipeline.edges.sink', 'pipeline.edges.outbox', 'pipeline.agents', 'faust'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=SOURCE.parents[2], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
