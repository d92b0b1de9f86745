"""The dashboard at ``GET /``, driven in headless Chromium (Debian's, through Playwright)
against a real worker on the real broker."""

from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from pipeline.settings import Settings

from .harness import Worker, feed, settings_from, wait_drained

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("PIPELINE_TEST_CHROMIUM", "/usr/bin/chromium")
# The machine has no outside network: without these, Chromium keeps trying Google's
# services at start. The sandbox needs user namespaces that CI (as root) lacks.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 (once per test, before any I/O)
        pytest.fail(f"{CHROMIUM} missing: scripts/system-packages installs Debian's chromium")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield b
        finally:
            await b.close()


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def _lookup(page: Page, form: str, field: str, value: str, out: str, url: str) -> str:
    """Look ``value`` up on the page, and check the page shows what the view at ``url``
    answers. Asked again a few times when they differ: a view lags its commit by the
    moment between the commit and the write to RocksDB, which wait_drained cannot see."""
    for attempt in range(5):
        await page.locator(out).evaluate("e => { e.textContent = '' }")
        await page.fill(field, value)
        await page.click(f"{form} button")
        await expect(page.locator(out)).to_contain_text(value)
        shown = await page.locator(out).inner_text()
        status, body = await asyncio.to_thread(_get, url)
        head, _, rest = shown.partition("\n")
        if head.startswith(str(status)) and json.loads(rest) == body:
            return shown
        await asyncio.sleep(0.5 * (attempt + 1))
    raise AssertionError(f"the page shows {shown!r}, the view answers {status} {body}")


async def _counter(page: Page, key: str) -> int:
    text = await page.locator(f'[data-counter="{key}"]').inner_text()
    return int(text.replace(",", ""))


async def test_dashboard_shows_live_counters_and_looks_up_state(
    env: dict[str, str],
    settings: Settings,
    make_worker: Callable[..., Worker],
    browser: Browser,
    tmp_path: Path,
) -> None:
    s = settings_from(env)
    count = 1500
    await feed(s, count, seed=5, dup_rate=0.3, bad_rate=0.02, illegal_rate=0.05)
    worker = make_worker()
    worker.start()
    await wait_drained(s, [worker], timeout=150)
    stats = worker.stats()
    assert stats is not None and stats["seen"] == count

    # An order that exists, and one user's balance, as the JSON views give them.
    status, order = await asyncio.to_thread(_get, f"http://127.0.0.1:{worker.web_port}/orders/o1")
    assert status == 200, order

    page = await browser.new_page()
    base = f"http://127.0.0.1:{worker.web_port}"
    await page.goto(base + "/")
    await expect(page).to_have_title("eos-pipeline worker")
    # The page polls /stats: the counters reach the worker's numbers.
    await expect(page.locator('[data-counter="seen"]')).to_have_text(f"{count:,}", timeout=10_000)
    for key in ("unique", "duplicates_dropped", "dlq", "changes", "rejected", "coupons"):
        want = int(stats[key])  # type: ignore[call-overload]
        assert want > 0, (key, stats)
        assert await _counter(page, key) == want, key
    await expect(page.locator("#guarantee")).to_have_text("exactly_once")
    await expect(page.locator("#state")).to_have_text("running")
    await expect(page.locator("#app")).to_have_text(s.app_id)
    # Every raw partition is processed by this single worker.
    raw_row = page.locator("#partitions tr", has_text=s.topic_raw)
    await expect(raw_row).to_have_text(
        f"{s.topic_raw}{', '.join(str(p) for p in range(s.partitions))}"
    )
    # Traffic while the page is open moves the counters and the throughput chart.
    await expect(page.locator("#chart-scale")).to_have_text("peak 0 events/s")
    await feed(s, 1000, seed=6, dup_rate=0.3, bad_rate=0.0, prefix="q")
    await expect(page.locator('[data-counter="seen"]')).to_have_text(
        f"{count + 1000:,}", timeout=60_000
    )
    await expect(page.locator("#chart-scale")).not_to_have_text("peak 0 events/s")
    peak = await page.locator("#chart-scale").inner_text()
    assert int(peak.split()[1]) > 0, peak
    await expect(page.locator("#line")).to_have_attribute("points", re.compile(r"\d+,\d"))
    # The lookups below compare two reads of the same state: let the later stages (state
    # machine, balances) finish the new traffic first (seen: a balance that moved between
    # the view read here and the page's read).
    await wait_drained(s, [worker], timeout=150)

    # Lookups go through the views; the page shows their status and body.
    shown = await _lookup(page, "#order-form", "#order-id", "o1", "#order-out", f"{base}/orders/o1")
    assert shown.startswith("200") and '"order_id": "o1"' in shown, shown

    await page.fill("#order-id", "no-such-order")
    await page.click("#order-form button")
    await expect(page.locator("#order-out")).to_contain_text("order not found")
    assert (await page.locator("#order-out").inner_text()).startswith("404")

    user = order["user_id"]
    shown = await _lookup(
        page, "#user-form", "#user-id", user, "#user-out", f"{base}/users/{user}/balance"
    )
    assert f'"user_id": "{user}"' in shown, shown
    await page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

    # A worker that goes away is reported, not shown as frozen numbers.
    worker.kill9()
    await expect(page.locator("#updated")).to_contain_text("worker unreachable", timeout=10_000)
    await page.close()


async def test_with_a_token_the_dashboard_asks_once_and_keeps_it_for_the_tab(
    settings: Settings, make_worker: Callable[..., Worker], browser: Browser
) -> None:
    token = "dashboard-token-0123456789"
    count = 300
    await feed(settings, count, seed=9, dup_rate=0.2, bad_rate=0.0)
    worker = make_worker("w0", PIPELINE_WEB_TOKEN=token)
    worker.start()
    await wait_drained(settings, [worker], timeout=150)
    base = f"http://127.0.0.1:{worker.web_port}"
    page = await browser.new_page()
    prompts: list[str] = []

    async def answer(dialog: Any) -> None:  # Playwright awaits an async handler
        prompts.append(dialog.message)
        await dialog.accept(token)

    page.on("dialog", answer)
    await page.goto(base + "/")
    await expect(page.locator('[data-counter="seen"]')).to_have_text(f"{count:,}", timeout=15_000)
    assert len(prompts) == 1 and "PIPELINE_WEB_TOKEN" in prompts[0]
    # Lookups send it too; a reload of the tab keeps it (no second prompt).
    await page.fill("#order-id", "o1")
    await page.click("#order-form button")
    await expect(page.locator("#order-out")).to_contain_text('"order_id": "o1"')
    await page.reload()
    await expect(page.locator('[data-counter="seen"]')).to_have_text(f"{count:,}", timeout=15_000)
    assert len(prompts) == 1
    # A new tab (no token kept) that declines the prompt is told, and not asked again.
    page.remove_listener("dialog", answer)
    other = await browser.new_page()
    declined: list[str] = []

    async def decline(dialog: Any) -> None:
        declined.append(dialog.message)
        await dialog.dismiss()

    other.on("dialog", decline)
    await other.goto(base + "/")
    await expect(other.locator("#updated")).to_contain_text("401", timeout=10_000)
    await asyncio.sleep(2.5)  # two more polls
    assert len(declined) == 1
    await page.close()
    await other.close()
