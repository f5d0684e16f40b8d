// A webhook receiver for r2f: verifies each delivery with the Standard Webhooks library.
//
// Setup (one line):  npm ci --prefix examples/typescript
//
//   R2F_WEBHOOK_SECRET=whsec_... npx --prefix examples/typescript tsx examples/typescript/webhook-receiver.ts --port 8080
//
// r2f signs every delivery as Standard Webhooks describes (the format Svix and cog/Replicate
// use): headers `webhook-id`, `webhook-timestamp` and `webhook-signature` (`v1,<base64
// HMAC-SHA256 of "<id>.<timestamp>.<body>">`, one per secret while a secret rotates), body
// `{"type": "job.succeeded", "timestamp": ..., "data": <event>}`. A receiver verifies the
// signature (and the timestamp's freshness), answers 401 when it does not verify, deduplicates
// by `webhook-id` (r2f retries until it gets a 2xx, and a job delivered again sends its events
// again under the same ids), and answers 2xx quickly. Prints one JSON line per request.
import { createServer } from "node:http";
import { parseArgs } from "node:util";
import { Webhook } from "standardwebhooks";

const { values: a } = parseArgs({
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string", default: "8080" },
    secret: { type: "string", multiple: true },
  },
});

const secrets = a.secret ?? [process.env.R2F_WEBHOOK_SECRET ?? ""];
const verifiers = secrets.map((s) => new Webhook(s));
const seen = new Set<string>();

const server = createServer((req, res) => {
  const chunks: Buffer[] = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const body = Buffer.concat(chunks).toString("utf8");
    const headers: Record<string, string> = {};
    for (const [k, v] of Object.entries(req.headers)) headers[k] = String(v);
    let event: any = null;
    for (const v of verifiers) {
      try {
        event = v.verify(body, headers);
        break;
      } catch {
        // Try the next secret (a rotation sends a signature per secret).
      }
    }
    const id = headers["webhook-id"] ?? "";
    const duplicate = event !== null && seen.has(id);
    if (event !== null) seen.add(id);
    console.log(
      JSON.stringify({ webhook_id: id, type: event?.type, job: event?.data?.id, verified: event !== null, duplicate }),
    );
    res.writeHead(event === null ? 401 : 200).end();
  });
});

server.listen(+a.port!, a.host!, () => {
  const addr = server.address();
  console.log(JSON.stringify({ listening: typeof addr === "object" && addr ? addr.port : a.port }));
});
