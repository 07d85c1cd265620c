"""Listens on 127.0.0.1:<argv[1]>; SIGUSR1 closes the port, SIGUSR2 opens it again."""

import signal
import socket
import sys

port = int(sys.argv[1])
server: socket.socket | None = None


def open_port(*_: object) -> None:
    global server
    if server is None:
        server = socket.create_server(("127.0.0.1", port))


def close_port(*_: object) -> None:
    global server
    if server is not None:
        server.close()
        server = None


signal.signal(signal.SIGUSR1, close_port)
signal.signal(signal.SIGUSR2, open_port)
open_port()
while True:
    if server is None:
        signal.pause()
        continue
    try:
        conn, _ = server.accept()
        conn.close()
    except OSError:
        pass  # closed by the signal handler while accepting
