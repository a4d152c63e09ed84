"""The garbage collector's settings for a serving process.

CPython's cycle collector runs whenever allocations of container objects outnumber
deallocations by 700 (generation 0's threshold), and each run walks every object that survived
into the generations it collects. A streamed token allocates dozens of short-lived containers
(JSON, events, futures), so at the default threshold the collector ran hundreds of times a
second under load, and each rare full collection walked every module, schema and table built
at startup: in the benchmark (bench/README.md) collections took ~1 s of a ~6 s run, one of them
207 ms, a pause every connected client saw as a stall.

Objects that exist when startup has finished live as long as the process, so they are moved
out of the collector's sight (`gc.freeze`), and generation 0 is collected every 10,000 net
allocations instead of 700: the same run then spent ~0.1 s in 22 collections, the longest
30 ms. Cycles are still collected, only later; nothing else changes.
"""

from __future__ import annotations

import gc

GENERATION0_THRESHOLD = 10_000


def tune_for_serving() -> None:
    """Call once, after startup and before serving."""
    gc.collect()  # what startup left behind is freed, not frozen
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GENERATION0_THRESHOLD, gen1, gen2)
