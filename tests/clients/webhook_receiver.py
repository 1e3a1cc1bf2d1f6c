#!/usr/bin/env python3
"""A webhook receiver for the tests, on the standard library only.

    webhook_receiver.py LOG SECRETS_FILE

Listens on 127.0.0.1 (a free port, printed as `port N` on the first line of stdout), and
appends one JSON line per request to LOG: path, the three Standard Webhooks headers, the body,
the status it answered, and whether the signature verified against the secrets in
SECRETS_FILE (a JSON object: path prefix -> list of `whsec_` secrets, read at each request),
checked here with Python's own hmac, independently of cible's code.

What it answers depends on the path:
  /ok/...          200
  /flaky/N/...     500 to the first N attempts of each webhook-id, then 200
  /gone/...        410
  /toggle/...      500 while the file named by the rest of the path exists (under /tmp), else 200
  /retry-after/... 429 with Retry-After: 1 to the first attempt of each id, then 200
  /hang/...        never answers (sleeps 120 s)
  /slow/MS/...     200 after MS milliseconds
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG, SECRETS = sys.argv[1], sys.argv[2]
lock = threading.Lock()
attempts = {}


def verify(path, headers, body):
    try:
        with open(SECRETS) as f:
            secrets = json.load(f)
    except (OSError, ValueError):
        return False
    mine = [s for prefix, found in secrets.items() if path.startswith(prefix) for s in found]
    signed = f"{headers.get('webhook-id')}.{headers.get('webhook-timestamp')}.".encode() + body
    presented = [p.split(",", 1)[1] for p in (headers.get("webhook-signature") or "").split() if p.startswith("v1,")]
    for secret in mine:
        key = base64.b64decode(secret.removeprefix("whsec_"))
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        if any(hmac.compare_digest(expected, p) for p in presented):
            return True
    return False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        parts = self.path.strip("/").split("/")
        wid = self.headers.get("webhook-id")
        with lock:
            attempts[(self.path, wid)] = attempts.get((self.path, wid), 0) + 1
            n = attempts[(self.path, wid)]
        status, extra = 200, {}
        kind = parts[0]
        if kind == "flaky":
            status = 500 if n <= int(parts[1]) else 200
        elif kind == "gone":
            status = 410
        elif kind == "toggle":
            status = 500 if os.path.exists("/tmp/" + parts[1]) else 200
        elif kind == "retry-after":
            if n == 1:
                status, extra = 429, {"Retry-After": "1"}
        elif kind == "hang":
            # Logged on arrival (the answer never comes).
            with lock:
                with open(LOG, "a") as f:
                    f.write(json.dumps({"path": self.path, "id": wid, "status": None,
                                        "body": body.decode("utf-8", "replace"),
                                        "verified": verify(self.path, {k.lower(): v for k, v in self.headers.items()}, body),
                                        "received_at": time.time()}) + "\n")
            time.sleep(120)
            return
        elif kind == "slow":
            time.sleep(int(parts[1]) / 1000)
        record = {
            "path": self.path,
            "id": wid,
            "timestamp": self.headers.get("webhook-timestamp"),
            "signature": self.headers.get("webhook-signature"),
            "body": body.decode("utf-8", "replace"),
            "status": status,
            "verified": verify(self.path, {k.lower(): v for k, v in self.headers.items()}, body),
            "received_at": time.time(),
        }
        with lock:
            with open(LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        self.send_response(status)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(f"port {server.server_address[1]}", flush=True)
server.serve_forever()
