"""What the engine guarantees, decided once: the processing guarantee, which fixes are
on, the limits, and the fatal exit.

Every other module asks a :class:`Policy`, never the settings, whether exactly-once
applies or a fix is on. It is frozen: a worker's guarantee cannot change while it runs.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from aiokafka.errors import InvalidProducerEpoch, ProducerFenced

if TYPE_CHECKING:
    from pipeline.settings import Settings

log = logging.getLogger(__name__)

#: The gaps of stock faust-streaming's exactly-once that this engine closes; each can be
#: switched off (``PIPELINE_DISABLE_FIX=name,...``) so tests can show the gap is real.
#: What each one is: the package docstring of :mod:`pipeline.eos`.
FIXES = (
    "route-by-source",
    "local-state",
    "fatal-commit",
    "flush-before-commit",
    "quiesce",
    "changelog-offsets",
)

#: Exit status of a worker that stopped because a transaction could not commit.
EXIT_COMMIT_FAILED = 70
#: Exit status of a test-only injected crash.
EXIT_INJECTED = 86
#: An event that fails this many times (its partition aborted and processed again from
#: the last commit each time) goes to the dead-letter topic instead.
MAX_ATTEMPTS = 3
#: A partition aborted this many times in a row without a commit in between ends the
#: process: something other than one event is wrong (the broker refuses the
#: transaction's changelog rows, or the dead-letter topic), and a restart is the move.
MAX_REWINDS_WITHOUT_COMMIT = 10
#: How long a transactional producer may take to start (its InitProducerId waits for
#: the broker to complete the previous owner's transaction): twice the transaction
#: timeout, after which the broker aborts that transaction by itself.
PRODUCER_START_S = 120.0
#: How long a broker check for an offset gap may take before its answer is unknown.
CHECK_TIMEOUT_S = 10.0
#: A partition given up because its producer was fenced waits this many session
#: timeouts for the group to assign it again (or to someone else); then the process
#: ends, and its restart rejoins the group (see ExactlyOnceTransactionManager._give_up).
FENCED_WAIT_SESSIONS = 3.0


def is_fence(exc: BaseException | None) -> bool:
    """Whether ``exc`` says another producer took this transactional id (a newer owner
    of the partition, or the broker after the transaction timed out): this worker no
    longer owns the partition's transactions, whatever the group last told it."""
    return isinstance(exc, ProducerFenced | InvalidProducerEpoch)


class Step(StrEnum):
    """The commit steps, in order (what each does: :mod:`pipeline.eos.commit`)."""

    QUIESCE = "quiesce"
    CHANGELOG = "changelog"
    DRAIN = "drain"
    OFFSETS = "offsets"
    COMMIT = "commit"
    PERSIST = "persist"
    BEGIN = "begin"


COMMIT_STEPS = tuple(Step)


@dataclass(frozen=True, slots=True)
class Policy:
    """The processing guarantee and the fixes that are on, resolved once."""

    exactly_once: bool
    fixes: frozenset[str] = frozenset(FIXES)

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            exactly_once=settings.exactly_once,
            fixes=frozenset(name for name in FIXES if settings.fix_enabled(name)),
        )

    def on(self, fix: str) -> bool:
        """Whether ``fix`` applies: only ever in exactly-once mode."""
        return self.exactly_once and fix in self.fixes


def fatal(message: str, exc: BaseException | None = None) -> None:
    """End the process now: a worker must never continue past a failed commit.

    ``os._exit`` rather than ``app.crash``: Faust's orderly shutdown commits again and
    flushes buffers, which is exactly what must not happen with a broken transaction.
    The supervisor (systemd, Kubernetes, the chaos harness) restarts the worker, which
    recovers from committed state.
    """
    if exc is None:
        log.critical("%s; exiting with status %d", message, EXIT_COMMIT_FAILED)
    else:
        log.critical("%s: %r; exiting with status %d", message, exc, EXIT_COMMIT_FAILED)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(EXIT_COMMIT_FAILED)
