// An r2f client: submit a job, follow its progress, wait for its result, or cancel it.
//
// Setup (one line):  npm ci --prefix examples/typescript
//
//   npx --prefix examples/typescript tsx examples/typescript/client.ts --prompt "a furry frog warrior" --model sd3
//
// It talks to the broker the way docs/contract.md describes, and to nothing else: the job goes to
// the exchange `r2f.jobs` with its model as routing key (publisher confirms), progress events come
// from the topic exchange `r2f.events`, the terminal event comes back on the client's own reply
// queue (`replyTo` + `correlationId`), and a cancel request goes to the exchange `r2f.control`
// (routing key `cancel`), answered on the same reply queue. With `--tenant` (a multi-tenant
// fleet) the job carries the broker user as `userId`, progress is bound per job
// (`job.progress.<tenant>.<id>`) and the reply queue is the tenant's (`r2f.reply.<tenant>.*`).
// Prints one JSON line per event; exits 0 only when the job succeeded.
import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";
import amqp from "amqplib";

const { values: a } = parseArgs({
  options: {
    amqp: { type: "string", default: "amqp://guest:guest@127.0.0.1:5672/%2f" },
    "jobs-exchange": { type: "string", default: "r2f.jobs" },
    "control-exchange": { type: "string", default: "r2f.control" },
    tenant: { type: "string" },
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
    // Queues named like a client's: r2f.reply.* (r2f.reply.<tenant>.* for a tenant).
    const own = a.tenant ? `r2f.reply.${a.tenant}.` : "r2f.reply.";
    const opts = { exclusive: true, autoDelete: true };
    // Progress: a private queue bound to this job's progress events.
    await ch.assertExchange(a["events-exchange"]!, "topic", { durable: true });
    const progressQ = (await ch.assertQueue(own + randomUUID(), opts)).queue;
    const key = a.tenant ? `job.progress.${a.tenant}.${jobId}` : `job.progress.${jobId}`;
    await ch.bindQueue(progressQ, a["events-exchange"]!, key);
    // The terminal event and the cancel answer: on our own reply queue.
    const replyQ = (await ch.assertQueue(own + randomUUID(), opts)).queue;
    // A tenant's messages carry its broker user, which RabbitMQ checks.
    const user = decodeURIComponent(new URL(a.amqp!).username || "guest");
    const userId = a.tenant ? user : undefined;

    let cancelled = false;
    const result = new Promise<any>((resolve) => {
      ch.consume(replyQ, (m) => {
        if (!m) return;
        if (m.properties.correlationId === `cancel-${jobId}`) {
          say({ cancel: JSON.parse(m.content.toString()) });
        } else if (m.properties.correlationId === jobId) {
          resolve(JSON.parse(m.content.toString()));
        }
      }, { noAck: true });
    });
    await ch.consume(progressQ, async (m) => {
      if (!m) return;
      const ev = JSON.parse(m.content.toString());
      if (ev.id !== jobId) return;
      say({ progress: ev });
      if (a["cancel-after-progress"] && !cancelled) {
        cancelled = true;
        // The worker stops at its next denoising step; the answer comes to our reply queue.
        ch.publish(a["control-exchange"]!, "cancel", Buffer.from(JSON.stringify({ id: jobId })), {
          contentType: "application/json",
          correlationId: `cancel-${jobId}`,
          replyTo: replyQ,
          userId,
        });
      }
    }, { noAck: true });

    ch.publish(a["jobs-exchange"]!, a.model!, Buffer.from(JSON.stringify(job)), {
      contentType: "application/json",
      persistent: true,
      messageId: jobId,
      correlationId: jobId,
      replyTo: replyQ,
      userId,
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
