"""The timing rule every benchmark here uses: best of several runs after a warm-up."""

from __future__ import annotations

import time


def best_time(function, repeats: int, sync=lambda: None) -> float:
    """Smallest wall time of ``repeats`` calls after one warm-up call (seconds).

    The smallest is the run least disturbed by other processes; ``sync`` waits for a GPU.
    """
    function()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)
