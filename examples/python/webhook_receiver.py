#!/usr/bin/env python3
"""A webhook receiver for r2f: verifies each delivery with the Standard Webhooks library.

Setup (one line):  python3 -m pip install -r examples/python/requirements.txt

    R2F_WEBHOOK_SECRET=whsec_... python3 examples/python/webhook_receiver.py --port 8080

r2f signs every delivery as Standard Webhooks describes (the same format Svix and
cog/Replicate use): headers `webhook-id`, `webhook-timestamp` and `webhook-signature`
(`v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, one per secret while a secret
rotates), body `{"type": "job.succeeded", "timestamp": ..., "data": <event>}`. A receiver:

- verifies the signature (and the timestamp's freshness) with the library, answering 401 when
  it does not verify;
- deduplicates by `webhook-id`: r2f retries until it gets a 2xx, and a job delivered again by the
  broker sends its events again under the same ids;
- answers 2xx quickly (work comes after), or 429/5xx (with `Retry-After`) to be tried later.

Prints one JSON line per request: the webhook id, the event type, whether it verified and
whether it was a duplicate. `--fail-first N` answers 503 to the first N deliveries of each id
(to see the retries); `--secret` may be given more than once (any one verifying is enough).
"""

import argparse
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--secret", action="append",
                   help="whsec_... (default: $R2F_WEBHOOK_SECRET); repeat to accept several")
    p.add_argument("--fail-first", type=int, default=0,
                   help="answer 503 to the first N deliveries of each webhook id")
    a = p.parse_args()
    secrets = a.secret or [os.environ["R2F_WEBHOOK_SECRET"]]
    verifiers = [Webhook(s) for s in secrets]
    seen: dict[str, int] = {}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            msg_id = headers.get("webhook-id", "")
            verified = False
            event = None
            for v in verifiers:
                try:
                    event = v.verify(body, headers)
                    verified = True
                    break
                except WebhookVerificationError:
                    continue
            with lock:
                n = seen.get(msg_id, 0) + 1 if verified else seen.get(msg_id, 0)
                if verified:
                    seen[msg_id] = n
            if not verified:
                status = 401
            elif n <= a.fail_first:
                status = 503
            else:
                status = 200
            print(json.dumps({
                "webhook_id": msg_id,
                "type": (event or {}).get("type"),
                "job": ((event or {}).get("data") or {}).get("id"),
                "verified": verified,
                "duplicate": n > a.fail_first + 1,
                "status": status,
            }), flush=True)
            self.send_response(status)
            if status == 503:
                self.send_header("Retry-After", "0")
            self.end_headers()

        def log_message(self, *args) -> None:  # quiet: one JSON line per request is enough
            pass

    server = ThreadingHTTPServer((a.host, a.port), Handler)
    print(json.dumps({"listening": server.server_address[1]}), flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
