"""The cyclic garbage collector, set for a worker that handles records in batches.

CPython's collector runs a young collection every 700 container allocations, and a full
one (every tracked object) every 100 young ones, give or take. A worker allocates a few
containers per record (the fetched record, its headers, the outputs), so on a backlog it
ran a young collection every few milliseconds and a full one every half second. Each
full one walked the 90,000 objects of Faust, aiokafka and the imported modules, none of
them ever garbage: 58 ms each. Measured on the dedup stage with a 200,000-event backlog
(``python -m pipeline bench --only dedup-eos``, one worker, 2 cores): 1.7 s of the
worker's 12.7 s of CPU went to the collector, and the full collections were pauses of
58 ms in the middle of a commit interval.

So, once the worker is up (:func:`settle`):

1. ``gc.freeze()`` moves everything alive then (the modules, the app, its topology) to
   the permanent generation, which collections no longer walk. Frozen objects are still
   freed by reference counting as usual; only a cycle among them would stay.
2. The young generation's threshold goes up to :data:`GEN0_THRESHOLD`, so the
   collector runs about 14 times less often. Cycles are still collected, later: the
   wait holds at most that many more objects.

The same backlog then took 0.5 s of collection, and the stage did 35,000 events/s
instead of 24,000 (``docs/benchmarks.md``, "The garbage collector"). A user who tuned
the collector (a higher threshold, or turned it off) is left alone.
"""

from __future__ import annotations

import gc

#: allocations (less deallocations) of containers between two young collections
GEN0_THRESHOLD = 10_000


def settle() -> None:
    """Freeze what is alive and space the young collections out (see the module)."""
    if not gc.isenabled():
        return  # turned off on purpose: not ours to turn on
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    if gen0 < GEN0_THRESHOLD:
        gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
