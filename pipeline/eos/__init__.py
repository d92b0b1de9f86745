"""Exactly-once processing on top of Faust: one Kafka transaction per source partition.

Why this package exists
-----------------------
Stock faust-streaming 0.15 ``processing_guarantee="exactly_once"`` has gaps that make
it lose or duplicate records under crashes (each has a switch in ``FIXES`` so tests can
show the gap is real; ``PIPELINE_DISABLE_FIX=name,...`` turns fixes off):

``route-by-source``
    ``TransactionManager.send`` picks the transactional producer from the *destination*
    topic and partition, so an output can commit in another transaction than the source
    offset that produced it. Here every send made while processing an event goes through
    the transaction of that event's *source* partition.
``local-state``
    Faust writes RocksDB immediately, so after a crash the local store can hold writes
    of an aborted transaction (an id marked as seen whose output never committed: that
    event is then lost). Here table writes stay in a per-partition overlay and reach
    RocksDB only after the Kafka transaction committed, in one write batch together
    with the changelog offset they correspond to. The state of a partition taken over
    is restored by :mod:`pipeline.eos.restore` with a consumer of its own, not by
    Faust's recovery, whose reads through the shared consumer can skip a range.
``fatal-commit``
    Commit, begin and abort errors other than ``ProducerFenced`` are logged and
    swallowed; the worker goes on with a broken transaction. Here any failure in the
    commit path ends the process (``os._exit``) so it restarts clean from committed state,
    except a fence met before ``commit_transaction`` itself: another producer owns the
    partition's transactional id, nothing of the transaction committed, and the partition
    is given up until the group assigns it again. A fenced partition is never taken back
    with a new producer of ours, whose ``InitProducerId`` would fence its new owner.
``flush-before-commit``
    The commit path does not wait for the ``send_soon`` buffer or for in-flight sends;
    a record still in a buffer is not part of the transaction that commits its offset.
    Here table changes are written into the transaction at commit time and every send
    future of the transaction is awaited before its offsets are added.
``quiesce``
    Faust commits from a background task while agents keep processing, so records of an
    event whose offset is not yet acked can land in a committed transaction; a crash then
    replays the event and duplicates them. Here the commit of a partition waits until the
    agent is between two events of that partition.
``changelog-offsets``
    ``TableManager.on_commit_tp`` looks pending changelog offsets up by *source* partition
    while they are stored by *changelog* partition (robinhood/faust#599), so persisted
    offsets lag. Here the persisted offset is written by the commit itself, keyed by the
    changelog partition it belongs to.

How the package is laid out
---------------------------
One module per guarantee; every touch of a Faust, mode or aiokafka internal is in
:mod:`pipeline.eos.faust`.

================  =====================================================================
``policy``        the processing guarantee and the fixes, decided once; limits; the
                  commit steps' names; the fatal exit
``partition``     one source partition's gate, open-transaction bookkeeping, held sends
``commit``        the seven commit steps, top to bottom, against a producer and a store
                  interface (unit-tested against fakes)
``stage``         what a stage is: ``handle(record, out)``, with table reads and
                  writes and outputs through ``out``
``delivery``      fetched batches and the rule that delivers each committed record
                  once, in order (:func:`~pipeline.eos.delivery.admit`)
``restore``       a taken-over partition's tables brought up to their changelogs' end,
                  with a consumer of the engine's own
``coordinator``   the stages' batch loop, settling after a rebalance, liveness, a
                  record's failure handling
``partitioner``   Kafka's default partitioner (murmur2), a word at a time
``collector``     the garbage collector's settings for a worker
``faults``        test-only fault points at the commit steps
``faust/``        the adapter: the transaction manager, consumer, producer and store
                  subclasses and wrappers
================  =====================================================================
"""

from pipeline.eos.commit import commit_partition
from pipeline.eos.coordinator import Coordinator
from pipeline.eos.delivery import CheckUnknown, Fetched, FetchLedger, KnownRecords
from pipeline.eos.faults import InjectedFailure
from pipeline.eos.faust.consumer import BatchingConsumerThread, SettlingConsumer
from pipeline.eos.faust.transactions import ExactlyOnceTransactionManager
from pipeline.eos.partition import OutRecord, PartitionState, progress_key
from pipeline.eos.policy import (
    CHECK_TIMEOUT_S,
    COMMIT_STEPS,
    EXIT_COMMIT_FAILED,
    EXIT_INJECTED,
    FIXES,
    MAX_ATTEMPTS,
    Policy,
    Step,
    fatal,
)

__all__ = [
    "CHECK_TIMEOUT_S",
    "COMMIT_STEPS",
    "EXIT_COMMIT_FAILED",
    "EXIT_INJECTED",
    "FIXES",
    "MAX_ATTEMPTS",
    "BatchingConsumerThread",
    "CheckUnknown",
    "Coordinator",
    "ExactlyOnceTransactionManager",
    "FetchLedger",
    "Fetched",
    "InjectedFailure",
    "KnownRecords",
    "OutRecord",
    "PartitionState",
    "Policy",
    "SettlingConsumer",
    "Step",
    "commit_partition",
    "fatal",
    "progress_key",
]
