"""graft's demo app: an ordinary HTTP server that knows nothing about graft.

Usage: python3 demo/app.py [PORT]   (default 8080)

Each request is answered with four facts this process sees. Run plainly they are
about this machine; run under `graft run --target pid:PID` they are the target's:

- the environment variable DATABASE_URL,
- the first line of /run/graft-demo/files/config.txt,
- the address the name payments.internal resolves to,
- the reply of an HTTP call to http://payments.internal/.
"""
import http.server
import os
import socket
import sys
import urllib.request

CONFIG = "/run/graft-demo/files/config.txt"
SERVICE = "payments.internal"


def facts():
    try:
        with open(CONFIG) as f:
            config = f.readline().strip()
    except OSError as e:
        config = f"cannot open: {e.strerror}"
    try:
        address = socket.getaddrinfo(SERVICE, 80, socket.AF_INET)[0][4][0]
    except OSError as e:
        address = f"does not resolve ({e})"
    try:
        with urllib.request.urlopen(f"http://{SERVICE}/", timeout=5) as response:
            call = response.read().decode().strip()
    except OSError as e:
        call = f"failed ({e})"
    return [
        f"answered by   demo/app.py, pid {os.getpid()} on this machine",
        f"DATABASE_URL  {os.environ.get('DATABASE_URL', '(not set)')}",
        f"{CONFIG}  {config}",
        f"{SERVICE} resolves to  {address}",
        f"GET http://{SERVICE}/  {call}",
    ]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        body = ("\n".join(facts()) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print(f"demo/app.py listening on port {port}", flush=True)
    server.serve_forever()
