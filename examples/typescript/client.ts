// An r2f client: submit a job, follow its progress, wait for its result, or cancel it.
//
// Setup (one line):  npm ci --prefix examples/typescript
//
//   npx --prefix examples/typescript tsx examples/typescript/client.ts --prompt "a furry frog warrior" --model sd3
//
// It talks to the broker the way docs/contract.md describes: the job goes to the exchange
// `r2f.jobs` with its model as routing key (publisher confirms), progress events come from the
// topic exchange `r2f.events`, and the terminal event comes back on the client's own reply queue
// (`replyTo` + `correlationId`). Cancelling writes the job's cancellation request to Redis, the
// key `r2f cancel` writes. Prints one JSON line per event; exits 0 only when the job succeeded.
import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";
import amqp from "amqplib";
import Redis from "ioredis";

const { values: a } = parseArgs({
  options: {
    amqp: { type: "string", default: "amqp://guest:guest@127.0.0.1:5672/%2f" },
    redis: { type: "string", default: "redis://127.0.0.1:6379" },
    "redis-prefix": { type: "string", default: "r2f" },
    "jobs-exchange": { type: "string", default: "r2f.jobs" },
    "events-exchange": { type: "string", default: "r2f.events" },
    id: { type: "string" },
    prompt: { type: "string" },
    model: { type: "string", default: "sd3" },
    mode: { type: "string", default: "plain" },
    steps: { type: "string", default: "28" },
    width: { type: "string", default: "1024" },
    height: { type: "string", default: "1024" },
    seed: { type: "string", default: "0" },
    timeout: { type: "string", default: "600" },
    "cancel-after-progress": { type: "boolean", default: false },
  },
});

const say = (o: unknown) => console.log(JSON.stringify(o));

async function main(): Promise<number> {
  if (!a.prompt) throw new Error("--prompt is required");
  const jobId = a.id ?? `ts-${randomUUID().slice(0, 12)}`;
  const job = {
    id: jobId,
    prompt: a.prompt,
    model: a.model,
    mode: a.mode,
    params: { steps: +a.steps!, width: +a.width!, height: +a.height!, seed: +a.seed! },
  };
  const conn = await amqp.connect(a.amqp!);
  try {
    const ch = await conn.createConfirmChannel();
    // Progress: a private queue bound to the progress events.
    await ch.assertExchange(a["events-exchange"]!, "topic", { durable: true });
    const progressQ = (await ch.assertQueue("", { exclusive: true, autoDelete: true })).queue;
    await ch.bindQueue(progressQ, a["events-exchange"]!, "job.progress");
    // The terminal event: on our own reply queue.
    const replyQ = (await ch.assertQueue("", { exclusive: true, autoDelete: true })).queue;

    let cancelled = false;
    const result = new Promise<any>((resolve) => {
      ch.consume(replyQ, (m) => {
        if (m && m.properties.correlationId === jobId) resolve(JSON.parse(m.content.toString()));
      }, { noAck: true });
    });
    await ch.consume(progressQ, async (m) => {
      if (!m) return;
      const ev = JSON.parse(m.content.toString());
      if (ev.id !== jobId) return;
      say({ progress: ev });
      if (a["cancel-after-progress"] && !cancelled) {
        cancelled = true;
        const r = new Redis(a.redis!);
        // What `r2f cancel` writes: the worker stops at its next denoising step.
        await r.set(`${a["redis-prefix"]}:cancel:${jobId}`, "1", "EX", 7 * 24 * 3600);
        r.disconnect();
        say({ cancel: "requested" });
      }
    }, { noAck: true });

    ch.publish(a["jobs-exchange"]!, a.model!, Buffer.from(JSON.stringify(job)), {
      contentType: "application/json",
      persistent: true,
      messageId: jobId,
      correlationId: jobId,
      replyTo: replyQ,
    });
    await ch.waitForConfirms();
    say({ submitted: jobId });

    const timeout = new Promise<null>((r) => setTimeout(() => r(null), +a.timeout! * 1000));
    const ev = await Promise.race([result, timeout]);
    if (ev === null) {
      say({ error: `no result within ${a.timeout} s` });
      return 2;
    }
    say({ result: ev });
    return ev.status === "succeeded" ? 0 : 1;
  } finally {
    await conn.close();
  }
}

main().then(
  (code) => process.exit(code),
  (e) => {
    console.error(`error: ${e?.message ?? e}`);
    process.exit(2);
  },
);
