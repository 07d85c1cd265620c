"""Leaves a daemon behind: a setsid'd grandchild that ignores SIGTERM.

Writes "<own pid> <grandchild pid>" into the FIFO given as argv[1] once the
middle process has exited (so the grandchild is re-parented), then waits.
"""

import os
import signal
import sys

r, w = os.pipe()
middle = os.fork()
if middle == 0:
    if os.fork() == 0:
        os.setsid()  # escape the agent's session and process group
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(w, f"{os.getpid()}\n".encode())
        while True:
            signal.pause()
    os._exit(0)
os.close(w)
os.waitpid(middle, 0)
grandchild = os.read(r, 64).decode().strip()
with open(sys.argv[1], "w") as f:
    f.write(f"{os.getpid()} {grandchild}\n")
while True:
    signal.pause()
