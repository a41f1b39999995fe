"""A service for the health tests (tests/test_health_agent.py): it writes its pid to PIDFILE,
then serves.

    python3 health_server.py http PORT PIDFILE   # HTTP/1.1, 200 to every GET
    python3 health_server.py tcp PORT PIDFILE    # accepts; on SIGUSR1 stops listening (and lives on)
"""

import http.server
import os
import signal
import socket
import sys
import time


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the stdlib's name)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def main() -> None:
    kind, port, pidfile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if kind == "http":
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
        server.serve_forever()
        return
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    sock.settimeout(0.05)
    closed = []
    signal.signal(signal.SIGUSR1, lambda *_: closed.append(sock.close()))
    with open(pidfile, "w") as f:
        f.write(f"{os.getpid()}\n")
    while True:
        if closed:
            time.sleep(1)
            continue
        try:
            conn, _ = sock.accept()
            conn.close()
        except (TimeoutError, OSError):
            pass


if __name__ == "__main__":
    main()
