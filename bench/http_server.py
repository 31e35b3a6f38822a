"""bench/http_server.py: the local HTTP/1.1 keep-alive server of `bench/run`
and of its target (one thread per connection). Usage: http_server.py PORT [BODY]."""
import socketserver
import sys
from http.server import BaseHTTPRequestHandler

BODY = (sys.argv[2] if len(sys.argv) > 2 else "local bench").encode() + b"\n"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: without TCP_NODELAY, Nagle and
    # delayed ACKs add 40 ms to every keep-alive request.
    disable_nagle_algorithm = True

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 2048

    def handle_error(self, request, client_address):
        # wrk resets its connections when it stops; that is not news.
        pass


Server(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
