"""HTTP on 127.0.0.1:<argv[1]>: 200 by default; SIGUSR1 makes it answer 500, SIGUSR2 200."""

import signal
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

status = 200


def set_status(code: int) -> None:
    global status
    status = code


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


signal.signal(signal.SIGUSR1, lambda *_: set_status(500))
signal.signal(signal.SIGUSR2, lambda *_: set_status(200))
HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever(poll_interval=0.05)
