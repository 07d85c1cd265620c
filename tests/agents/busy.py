"""Burns CPU in two threads, keeps files open, writes to disk and runs a child."""

import os
import subprocess
import sys
import threading

child = subprocess.Popen(["sleep", "1000"])
files = [open(os.devnull) for _ in range(5)]  # noqa: SIM115 - held open on purpose
with open(sys.argv[1], "wb") as out:
    out.write(os.urandom(1 << 20))
    out.flush()
    os.fsync(out.fileno())


def spin() -> None:
    while True:
        sum(range(10_000))


threading.Thread(target=spin, daemon=True).start()
spin()
