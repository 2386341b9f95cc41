"""A tiny app for end-to-end tests: `python hello_app.py [PORT VERSION]` answers {"version": VERSION}.

PORT and VERSION default to $PORT and $SERVICE_VERSION (as `meshctl up` sets
them). GET /health answers 503 while the file named by $UNHEALTHY_IF exists; every
other path answers 503 while the file named by $FAIL_IF exists.
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        flag = os.environ.get("UNHEALTHY_IF")
        fail = os.environ.get("FAIL_IF")
        status = 503 if self.path == "/health" and flag and os.path.exists(flag) else 200
        if self.path != "/health" and fail and os.path.exists(fail):
            status = 503
        body = json.dumps({"version": VERSION, "path": self.path, "instance": os.environ.get("POD_NAME", "")}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ["PORT"])
    VERSION = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("SERVICE_VERSION", "v1")
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
