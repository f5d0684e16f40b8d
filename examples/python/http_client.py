#!/usr/bin/env python3
"""An r2f client over HTTP (the gateway): submit a job, follow its events, fetch its image,
or cancel it. The standard library only; the types come from r2f_api.py, generated from the
gateway's OpenAPI document (scripts/openapi_types.py).

    python3 http_client.py --url http://localhost:8080 --key r2f_... --prompt "a furry frog warrior"

Prints one JSON object a line: {"accepted": ...}, {"event": ..., "data": ...} for each event,
{"result": ...} and {"image": ...} for each image fetched. Exit 0 when the job succeeded, 1
when it ended otherwise, 2 on a refused request.
"""

import argparse
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Iterator, Optional, Tuple, cast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from r2f_api import Accepted, ApiError, CancelAnswer, JobStatus, ResultEvent  # noqa: E402

TERMINAL = {"succeeded", "failed", "rejected", "cancelled"}


class Gateway:
    def __init__(self, url: str, key: str, timeout: float):
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout

    def request(self, method: str, path: str, body: Optional[dict] = None,
                headers: Optional[dict] = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        return urllib.request.urlopen(req, timeout=self.timeout)

    def call(self, method: str, path: str, body: Optional[dict] = None,
             headers: Optional[dict] = None) -> dict:
        """The JSON answer; a refusal exits with its error (and waits out a 429 first)."""
        for _ in range(10):
            try:
                with self.request(method, path, body, headers) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                err = cast(ApiError, json.loads(e.read() or b"{}"))
                if e.code == 429:
                    time.sleep(float(e.headers.get("Retry-After", "1")))
                    continue
                print(json.dumps({"refused": e.code, **err}), flush=True)
                sys.exit(2)
        sys.exit(2)

    def submit(self, job: dict, idempotency_key: str) -> Accepted:
        # The same Idempotency-Key on a retry answers the job of the first request.
        return cast(Accepted, self.call("POST", "/v1/jobs", job,
                                        {"Idempotency-Key": idempotency_key}))

    def status(self, job_id: str) -> JobStatus:
        return cast(JobStatus, self.call("GET", f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> CancelAnswer:
        return cast(CancelAnswer, self.call("POST", f"/v1/jobs/{job_id}/cancel"))

    def events(self, job_id: str) -> Iterator[Tuple[str, dict]]:
        """The job's events until the terminal one, reconnecting with Last-Event-ID when the
        stream breaks (a gateway that drains ends its streams)."""
        last: Optional[str] = None
        for _ in range(20):
            headers = {"Accept": "text/event-stream"}
            if last:
                headers["Last-Event-ID"] = last
            try:
                with self.request("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
                    name, data, eid = "message", [], None
                    for raw in r:
                        line = raw.decode().rstrip("\r\n")
                        if line.startswith(":"):
                            continue  # keep-alive
                        if line == "":
                            if data:
                                if eid:
                                    last = eid
                                yield name, json.loads("\n".join(data))
                                if name in TERMINAL:
                                    return
                            name, data, eid = "message", [], None
                        elif line.startswith("event:"):
                            name = line[6:].strip()
                        elif line.startswith("data:"):
                            data.append(line[5:].lstrip())
                        elif line.startswith("id:"):
                            eid = line[3:].strip()
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise SystemExit("the event stream kept breaking")


def main() -> int:
    ap = argparse.ArgumentParser(description="Submit a job over HTTP and follow it.")
    ap.add_argument("--url", default=os.environ.get("R2F_URL", "http://localhost:8080"))
    ap.add_argument("--key", default=os.environ.get("R2F_API_KEY"))
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--model")
    ap.add_argument("--mode", default="plain", choices=["plain", "r2f", "r2fplus"])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--width", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--out", help="a folder for the images (fetched through their presigned URLs)")
    ap.add_argument("--cancel-after-progress", action="store_true",
                    help="cancel the job at its first progress event")
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()
    if not a.key:
        ap.error("--key (or R2F_API_KEY) is needed")
    gw = Gateway(a.url, a.key, a.timeout)
    params = {"steps": a.steps}
    if a.width:
        params["width"] = a.width
    if a.height:
        params["height"] = a.height
    job = {"prompt": a.prompt, "mode": a.mode, "params": params}
    if a.model:
        job["model"] = a.model
    accepted = gw.submit(job, idempotency_key=os.urandom(16).hex())
    print(json.dumps({"accepted": accepted}), flush=True)
    result: Optional[ResultEvent] = None
    cancelled = False
    for name, data in gw.events(accepted["id"]):
        print(json.dumps({"event": name, "data": data}), flush=True)
        if name == "progress" and a.cancel_after_progress and not cancelled:
            print(json.dumps({"cancel": gw.cancel(accepted["id"])}), flush=True)
            cancelled = True
        if name in TERMINAL:
            result = cast(ResultEvent, data)
    if result is None:
        return 1
    print(json.dumps({"result": result}), flush=True)
    # The status record says the same, with fresh URLs.
    status = gw.status(accepted["id"])
    assert status["state"] == result["status"], status
    if result["status"] != "succeeded":
        return 1
    for i, out in enumerate(result.get("outputs", [])):
        url = out.get("url")
        if not (a.out and url):
            continue
        with urllib.request.urlopen(url, timeout=a.timeout) as r:
            data = r.read()
        digest = hashlib.sha256(data).hexdigest()
        path = os.path.join(a.out, f"{accepted['id']}-{i}{os.path.splitext(out['uri'])[1]}")
        with open(path, "wb") as f:
            f.write(data)
        print(json.dumps({"image": path, "bytes": len(data), "sha256": digest,
                          "matches": digest == out["sha256"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
