"""A TCP echo server like Istio's tcp-echo image (samples/tcp-echo/src): every line
a client sends comes back prefixed, "hello" → "one hello".

`python tcp_echo_app.py PREFIX [PORT]`; PORT defaults to $PORT (as `meshctl up` sets it).
"""

import os
import socketserver
import sys


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(PREFIX.encode() + b" " + line)
            self.wfile.flush()


if __name__ == "__main__":
    PREFIX = sys.argv[1]
    port = int(sys.argv[2]) if len(sys.argv) > 2 else int(os.environ["PORT"])
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler).serve_forever()
