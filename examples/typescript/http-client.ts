// An r2f client over HTTP (the gateway): submit a job, follow its events, fetch its image, or
// cancel it. Node's fetch only; the types come from r2f-api.ts, generated from the gateway's
// OpenAPI document (scripts/openapi_types.py).
//
//   npx tsx http-client.ts --url http://localhost:8080 --key r2f_... --prompt "a furry frog warrior"
//
// Prints one JSON object a line: {"accepted": ...}, {"event": ..., "data": ...} for each event,
// {"result": ...} and {"image": ...} for each image fetched. Exit 0 when the job succeeded, 1
// when it ended otherwise, 2 on a refused request.

import { createHash, randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { extname, join } from "node:path";
import { parseArgs } from "node:util";
import type { Accepted, ApiError, CancelAnswer, JobStatus, ResultEvent } from "./r2f-api.ts";

const TERMINAL = new Set(["succeeded", "failed", "rejected", "cancelled"]);

const { values: a } = parseArgs({
  options: {
    url: { type: "string", default: process.env.R2F_URL ?? "http://localhost:8080" },
    key: { type: "string", default: process.env.R2F_API_KEY },
    prompt: { type: "string" },
    model: { type: "string" },
    mode: { type: "string", default: "plain" },
    steps: { type: "string", default: "28" },
    width: { type: "string" },
    height: { type: "string" },
    out: { type: "string" },
    "cancel-after-progress": { type: "boolean", default: false },
    timeout: { type: "string", default: "600" },
  },
});
if (!a.prompt || !a.key) {
  console.error("--prompt and --key (or R2F_API_KEY) are needed");
  process.exit(2);
}
const base = a.url!.replace(/\/$/, "");
const timeoutMs = Number(a.timeout) * 1000;
const out = (o: unknown) => console.log(JSON.stringify(o));

async function call<T>(method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<T> {
  for (let i = 0; i < 10; i++) {
    const r = await fetch(base + path, {
      method,
      headers: {
        Authorization: `Bearer ${a.key}`,
        ...(body === undefined ? {} : { "Content-Type": "application/json" }),
        ...headers,
      },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(timeoutMs),
    });
    if (r.ok) return (await r.json()) as T;
    const err = (await r.json().catch(() => ({}))) as ApiError;
    if (r.status === 429) {
      await new Promise((ok) => setTimeout(ok, Number(r.headers.get("retry-after") ?? "1") * 1000));
      continue;
    }
    out({ refused: r.status, ...err });
    process.exit(2);
  }
  process.exit(2);
}

// The job's events until the terminal one, reconnecting with Last-Event-ID when the stream
// breaks (a gateway that drains ends its streams).
async function* events(id: string): AsyncGenerator<[string, any]> {
  let last: string | undefined;
  for (let attempt = 0; attempt < 20; attempt++) {
    try {
      const r = await fetch(`${base}/v1/jobs/${id}/events`, {
        headers: {
          Authorization: `Bearer ${a.key}`,
          Accept: "text/event-stream",
          ...(last ? { "Last-Event-ID": last } : {}),
        },
      });
      if (!r.ok || !r.body) throw new Error(`HTTP ${r.status}`);
      const decoder = new TextDecoder();
      let buffer = "";
      let name = "message";
      let data: string[] = [];
      let eid: string | undefined;
      for await (const chunk of r.body as any as AsyncIterable<Uint8Array>) {
        buffer += decoder.decode(chunk, { stream: true });
        let nl: number;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl).replace(/\r$/, "");
          buffer = buffer.slice(nl + 1);
          if (line.startsWith(":")) continue; // keep-alive
          if (line === "") {
            if (data.length) {
              if (eid) last = eid;
              yield [name, JSON.parse(data.join("\n"))];
              if (TERMINAL.has(name)) return;
            }
            name = "message";
            data = [];
            eid = undefined;
          } else if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
          else if (line.startsWith("id:")) eid = line.slice(3).trim();
        }
      }
    } catch {
      // Reconnect below.
    }
    await new Promise((ok) => setTimeout(ok, 500));
  }
  throw new Error("the event stream kept breaking");
}

const params: Record<string, number> = { steps: Number(a.steps) };
if (a.width) params.width = Number(a.width);
if (a.height) params.height = Number(a.height);
const job: Record<string, unknown> = { prompt: a.prompt, mode: a.mode, params };
if (a.model) job.model = a.model;
// The same Idempotency-Key on a retry answers the job of the first request.
const accepted = await call<Accepted>("POST", "/v1/jobs", job, {
  "Idempotency-Key": randomBytes(16).toString("hex"),
});
out({ accepted });
let result: ResultEvent | undefined;
let cancelled = false;
for await (const [name, data] of events(accepted.id)) {
  out({ event: name, data });
  if (name === "progress" && a["cancel-after-progress"] && !cancelled) {
    out({ cancel: await call<CancelAnswer>("POST", `/v1/jobs/${accepted.id}/cancel`) });
    cancelled = true;
  }
  if (TERMINAL.has(name)) result = data as ResultEvent;
}
if (!result) process.exit(1);
out({ result });
// The status record says the same, with fresh URLs.
const status = await call<JobStatus>("GET", `/v1/jobs/${accepted.id}`);
if (status.state !== result.status) throw new Error(`status ${status.state} != ${result.status}`);
if (result.status !== "succeeded") process.exit(1);
for (const [i, o] of result.outputs?.entries() ?? []) {
  if (!a.out || !o.url) continue;
  const r = await fetch(o.url, { signal: AbortSignal.timeout(timeoutMs) });
  const bytes = Buffer.from(await r.arrayBuffer());
  const digest = createHash("sha256").update(bytes).digest("hex");
  const path = join(a.out, `${accepted.id}-${i}${extname(o.uri)}`);
  writeFileSync(path, bytes);
  out({ image: path, bytes: bytes.length, sha256: digest, matches: digest === o.sha256 });
}
process.exit(0);
