"""Allocates argv[1] MiB, touching every page so it is resident, then waits."""

import signal
import sys

size = int(sys.argv[1]) << 20
block = bytearray(size)
for i in range(0, size, 4096):
    block[i] = 1
while True:
    signal.pause()
