"""Test-only fault injection at the commit steps and after an event's effects.

Every switch is a ``PIPELINE_*`` setting that is off in production; each fault lands
where a test needs it to (see :meth:`Faults.applies`), so the test's verdict never
depends on timing.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from faust.types import TP

from pipeline.eos.partition import PartitionState
from pipeline.eos.policy import EXIT_INJECTED, Step

if TYPE_CHECKING:
    from pipeline.settings import Settings

log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Test-only: a commit step failed on purpose."""


class Faults:
    """The fault points of one worker (all inert unless a test switch is set)."""

    def __init__(
        self,
        settings: Settings,
        partitions: Mapping[TP, PartitionState],
        on_abort: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.partitions = partitions
        self.on_abort = on_abort
        self._crash_count = 0
        self._fail_count = 0

    @property
    def delays(self) -> bool:
        return self.settings.delay_at is not None

    def applies(self, step: Step, tp: TP, st: PartitionState) -> bool:
        """Does a fault at ``step`` of ``tp``'s commit pass the filters?

        ``PIPELINE_FAULT_TOPIC`` keeps faults to one source topic's partitions, and
        ``PIPELINE_FAULT_MIN_EVENTS`` to transactions holding at least that many events,
        so that a test's fault always lands on the stage it judges, with work in flight,
        however fast the machine drains its input.
        """
        settings = self.settings
        if settings.fault_topic and tp.topic != settings.fault_topic:
            return False
        events = st.events if step is Step.QUIESCE else st.txn_events
        return events >= settings.fault_min_events

    def crash_point(self, step: Step, tp: TP, st: PartitionState) -> None:
        """``PIPELINE_CRASH_AT=<step>`` dies before that step."""
        if self.settings.crash_at != step.value or not self.applies(step, tp, st):
            return
        self._crash_count += 1
        if self._crash_count > self.settings.crash_after:
            log.warning("fault injection: crashing at commit step %r", step.value)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(EXIT_INJECTED)

    async def fail_point(self, step: Step, txn: Any, tp: TP, st: PartitionState) -> None:
        """``PIPELINE_FAIL_AT=<step>`` aborts one transaction and raises there.

        Exactly one partition's commit fails (the first after ``crash_after`` have
        passed the step and the filters of :meth:`applies`), as when the broker times
        out one transaction while the others commit. It fails only once the other
        partitions' commits of the same round have ended: whatever they committed
        (offsets of events whose records sit in this transaction, when routing is
        broken) is then committed for certain when this one aborts.
        """
        if self.settings.fail_at != step.value or not self.applies(step, tp, st):
            return
        self._fail_count += 1
        if self._fail_count == self.settings.crash_after + 1:
            await self._others_committed(st)
            log.warning(
                "fault injection: failing commit step %r of %s (%d events in the transaction)",
                step.value,
                tp,
                st.txn_events,
            )
            await txn.abort_transaction()
            self.on_abort()
            raise InjectedFailure(f"injected failure at commit step {step.value}")

    async def _others_committed(self, st: PartitionState, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(round(timeout / 0.01)):  # polled: test-only, and bounded
            if loop.time() > deadline or not any(
                o.step for o in self.partitions.values() if o is not st
            ):
                return
            await asyncio.sleep(0.01)

    async def delay_point(self, step: Step, tp: TP, st: PartitionState) -> None:
        """``PIPELINE_DELAY_AT=<step>`` pauses every commit that passes the filters at
        that step for ``PIPELINE_DELAY_S``, as a long pause of the loop would."""
        if self.settings.delay_at == step.value and self.applies(step, tp, st):
            log.warning(
                "fault injection: delaying commit step %r of %s by %g s",
                step.value,
                tp,
                self.settings.delay_s,
            )
            await asyncio.sleep(self.settings.delay_s)

    def planted_failure(self) -> Callable[[str, Any], None] | None:
        """``PIPELINE_FAIL_EVENT``: a failure after the handler's effects."""
        settings = self.settings
        needle = settings.fail_event
        if needle is None:
            return None
        marker = needle.encode()
        left = [settings.fail_event_times]

        def check(topic: str, value: Any) -> None:
            if settings.fail_event_topic not in (None, topic):
                return
            if not isinstance(value, bytes) or marker not in value:
                return
            if settings.fail_event_times and left[0] <= 0:
                return
            left[0] -= 1
            raise InjectedFailure(f"planted failure after processing a record with {needle!r}")

        return check
