"""The whole chain under kill -9 of two workers: dedup -> state machine -> repartition ->
balances, checked by the independent rebuild and through both workers' web views."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client.parser import text_string_to_metric_families

from pipeline.settings import Settings
from pipeline.tools.reconcile import reconcile

from .harness import Worker, feed, progress, settled_owners, wait_drained

pytestmark = pytest.mark.integration


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    for attempt in range(20):
        try:
            async with session.get(url) as resp:
                body = await resp.json(content_type=None)
                if resp.status < 500:
                    return resp.status, body
        except (TimeoutError, aiohttp.ClientError):
            pass
        await asyncio.sleep(0.2 * (attempt + 1))
    raise AssertionError(f"no answer from {url}")


def _owner_partition(key: str, partitions: int) -> int:
    # The partition Kafka's default partitioner (murmur2) gives the key: where the
    # table row lives, and so which worker owns it.
    return DefaultPartitioner()(key.encode(), list(range(partitions)), list(range(partitions)))


@pytest.mark.slow
async def test_full_chain_two_workers_killed_repeatedly(
    settings: Settings, make_worker: Callable[..., Worker]
) -> None:
    count = 26_000  # about 5,000 orders and their lifecycles, with 30% re-sent copies
    rng = random.Random(7)
    produced = asyncio.create_task(
        feed(settings, count, seed=21, dup_rate=0.3, bad_rate=0.01, illegal_rate=0.06)
    )
    a, b = make_worker("a"), make_worker("b")
    a.start()
    b.start()
    workers = [a, b]
    # Kill -9 a worker at a random point of processing, four times, and restart it.
    for round_ in range(4):
        done, _ = await progress(settings)
        target = done + rng.randrange(1500, 4000)
        for _ in range(600):
            now, total = await progress(settings)
            if now >= target or (produced.done() and now >= total):
                break
            await asyncio.sleep(0.1)
        victim = workers[round_ % 2]
        victim.kill9()
        await asyncio.sleep(rng.uniform(0.5, 3))
        victim.start()
    assert await produced == count
    await wait_drained(settings, workers, timeout=300)

    report = await reconcile(settings)
    assert report.input_records == count
    assert report.ok, report.render()
    by_topic = {c.topic: c for c in report.checks}
    assert by_topic[settings.topic_rejected].expected > 100  # illegal events were there
    assert by_topic[settings.topic_coupons].expected > 1000
    assert len(report.orders) >= 5000

    # Every order and balance, asked on either worker, equals the rebuilt state.
    # Views answer during a rebalance too, from a copy that may be behind (and say so);
    # the comparison is with the settled state: both workers own partitions, neither is
    # rebalancing, and together they own each partition once.
    owned = await settled_owners(workers, settings.topic_unique, settings.partitions, timeout=120)
    routed = 0
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        sem = asyncio.Semaphore(32)

        wrong: list[str] = []

        async def check(w: Worker, path: str, want: dict[str, Any]) -> None:
            # A view lags a commit by the moment between the commit and its write to
            # RocksDB (step 6), which wait_drained cannot see: ask again for a while
            # before calling an answer wrong.
            for attempt in range(10):
                async with sem:
                    status, body = await _get(session, f"http://127.0.0.1:{w.web_port}{path}")
                if status == 200 and body == want:
                    return
                await asyncio.sleep(0.2 * (attempt + 1))
            if status != 200 or body != want:
                key = path.split("/")[2]
                part = _owner_partition(key, settings.partitions)
                owner = [n for n, ps in owned.items() if part in ps]
                wrong.append(f"{w.name} {path} (p{part}, owner {owner}): {status} {body} != {want}")

        jobs = []
        for w in workers:
            for oid, order in report.orders.items():
                if _owner_partition(oid, settings.partitions) not in owned[w.name]:
                    routed += 1
                jobs.append(check(w, f"/orders/{oid}", order.to_json()))
            for uid, bal in report.balances.items():
                jobs.append(check(w, f"/users/{uid}/balance", bal.to_json()))
        await asyncio.gather(*jobs)
        assert not wrong, f"{len(wrong)} wrong answers, e.g.\n" + "\n".join(wrong[:10])
        # No rebalance came in between, so the routing above was to settled owners.
        assert (
            await settled_owners(workers, settings.topic_unique, settings.partitions, timeout=5)
            == owned
        )
        assert routed > 1000  # half the questions went to the worker that does not own the key

        # Unknown and malformed keys: clear JSON errors.
        status, body = await _get(session, f"http://127.0.0.1:{a.web_port}/orders/no-such-order")
        assert status == 404 and body["error"] == "order not found"
        status, body = await _get(session, f"http://127.0.0.1:{a.web_port}/orders/{'x' * 200}")
        assert status == 400 and "order_id" in body["error"]
        status, body = await _get(session, f"http://127.0.0.1:{b.web_port}/users/nobody/balance")
        assert status == 404

        # Faust's own pages are off (PIPELINE_WEB_FAUST_PAGES): no raw table rows and
        # no routing table behind the views' back.
        for path in ("/router/", "/table/orders/", "/table/users.balances/"):
            async with session.get(f"http://127.0.0.1:{a.web_port}{path}") as resp:
                assert resp.status == 404, (path, resp.status, await resp.text())

        # /metrics: Prometheus text with the same counters as /stats.
        for w in workers:
            st = w.stats()
            assert st is not None
            async with session.get(f"http://127.0.0.1:{w.web_port}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            values = {
                s.name: s.value
                for fam in text_string_to_metric_families(text)
                for s in fam.samples
                if not s.labels
            }
            assert values["pipeline_events_seen_total"] == st["seen"]
            assert values["pipeline_order_changes_total"] == st["changes"]
            for field, name in (
                ("unique", "pipeline_events_unique_total"),
                ("duplicates_dropped", "pipeline_duplicates_dropped_total"),
                ("dlq", "pipeline_dead_letters_total"),
                ("rejected", "pipeline_orders_rejected_total"),
                ("coupons", "pipeline_coupons_issued_total"),
                ("commits", "pipeline_commits_total"),
                # One histogram observation per commit round.
                ("commits", "pipeline_commit_duration_seconds_count"),
            ):
                assert values[name] == st[field], (name, values[name], st)
            labeled = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text)
                for s in fam.samples
                if s.labels
            }
            # Every table has keys on a worker that processed; lag is reported for every
            # owned source partition; Faust's own sensor counted the records it delivered.
            for table in ("dedup", "orders", "users.balances"):
                assert labeled[("pipeline_table_keys", (("table", table),))] > 0, table
            owned = sum(len(ps) for ps in st["partitions"].values())  # type: ignore[attr-defined]
            lags = [k for k in labeled if k[0] == "pipeline_consumer_lag"]
            assert len(lags) == owned > 0
            assert values["faust_messages_received_total"] >= st["seen"]
            assert values["pipeline_recovery_seconds_count"] >= 1
