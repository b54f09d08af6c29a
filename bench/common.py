"""What the bench scripts share (imported as `common`: a script's own folder is first on sys.path).

    load_avg()        the 1/5/15-minute load average, printed beside every figure (a shared machine is noisy)
    rate(fn, s)       calls of fn per second over about s seconds
"""

import os
import time


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def rate(fn, seconds: float) -> float:
    """Calls of fn per second over about `seconds`."""
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        calls += 1
    return calls / elapsed
