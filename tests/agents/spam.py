"""Writes argv[1] numbered lines of 100 bytes to stdout and one to stderr, then waits."""

import signal
import sys

for i in range(int(sys.argv[1])):
    sys.stdout.write(f"{i:08d} " + "x" * 90 + "\n")
sys.stdout.flush()
sys.stderr.write("done\n")
sys.stderr.flush()
while True:
    signal.pause()
