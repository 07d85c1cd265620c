"""A fork bomb: every process forks for ever, each child joins in.

A failed fork is retried after 5 ms (a little mercy for a 2-core CI machine:
the point is an unbounded number of processes, not a CPU burn). Prints one
line per 100 failed forks so its log grows too.
"""

import os
import sys
import time

failures = 0
while True:
    try:
        pid = os.fork()
    except OSError:
        failures += 1
        if failures % 100 == 0:
            print(f"{os.getpid()}: {failures} forks refused", flush=True)
        time.sleep(0.005)
        continue
    if pid == 0:
        failures = 0  # the child is one more bomber
        sys.stdout.flush()
