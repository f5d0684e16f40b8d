#!/usr/bin/env python3
"""An r2f client: submit a job, follow its progress, wait for its result, or cancel it.

Setup (one line):  python3 -m pip install -r examples/python/requirements.txt

    python3 examples/python/client.py --prompt "a furry frog warrior" --model sd3
    python3 examples/python/client.py --prompt "..." --model sd3 --cancel-after-progress

It talks to the broker the way docs/contract.md describes: the job goes to the exchange
`r2f.jobs` with its model as routing key (publisher confirms), progress events come from the
topic exchange `r2f.events`, and the terminal event comes back on the client's own reply queue
(`reply_to` + `correlation_id`). Cancelling writes the job's cancellation request to Redis, the
key `r2f cancel` writes. Prints one JSON line per event and exits 0 only when the job succeeded.
"""

import argparse
import asyncio
import json
import sys
import uuid

import aio_pika
import redis.asyncio as aioredis


async def run(a: argparse.Namespace) -> int:
    job_id = a.id or f"py-{uuid.uuid4().hex[:12]}"
    job = {
        "id": job_id,
        "prompt": a.prompt,
        "model": a.model,
        "mode": a.mode,
        "params": {"steps": a.steps, "width": a.width, "height": a.height, "seed": a.seed},
    }
    conn = await aio_pika.connect_robust(a.amqp)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        # Progress: a private queue bound to this job's events.
        events = await ch.declare_exchange(a.events_exchange, aio_pika.ExchangeType.TOPIC,
                                           durable=True)
        progress_q = await ch.declare_queue("", exclusive=True, auto_delete=True)
        await progress_q.bind(events, routing_key="job.progress")
        # The terminal event: on our own reply queue. Workers answer only queues named like a
        # client's (amqp.reply_to_prefixes: r2f.reply.*, server-named amq.gen-*, direct reply-to);
        # aio-pika names anonymous queues itself (amq_...), so this one is named explicitly.
        reply_q = await ch.declare_queue(f"r2f.reply.{uuid.uuid4().hex}", exclusive=True,
                                         auto_delete=True)
        jobs = await ch.get_exchange(a.jobs_exchange, ensure=False)
        await jobs.publish(
            aio_pika.Message(
                json.dumps(job).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=job_id,
                correlation_id=job_id,
                reply_to=reply_q.name,
            ),
            routing_key=a.model,
            mandatory=True,
        )
        print(json.dumps({"submitted": job_id, "reply_to": reply_q.name}), flush=True)

        cancelled = False
        result = asyncio.get_running_loop().create_future()

        async def on_progress(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal cancelled
            async with msg.process():
                ev = json.loads(msg.body)
                if ev.get("id") != job_id:
                    return
                print(json.dumps({"progress": ev}), flush=True)
                if a.cancel_after_progress and not cancelled:
                    cancelled = True
                    r = aioredis.from_url(a.redis)
                    # What `r2f cancel` writes: the worker stops at its next denoising step.
                    await r.set(f"{a.redis_prefix}:cancel:{job_id}", "1", ex=7 * 24 * 3600)
                    await r.aclose()
                    print(json.dumps({"cancel": "requested"}), flush=True)

        async def on_reply(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with msg.process():
                if msg.correlation_id == job_id and not result.done():
                    result.set_result(json.loads(msg.body))

        await progress_q.consume(on_progress)
        await reply_q.consume(on_reply)
        try:
            ev = await asyncio.wait_for(result, timeout=a.timeout)
        except asyncio.TimeoutError:
            print(json.dumps({"error": f"no result within {a.timeout} s"}), flush=True)
            return 2
        print(json.dumps({"result": ev}), flush=True)
        return 0 if ev.get("status") == "succeeded" else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    p.add_argument("--redis", default="redis://127.0.0.1:6379")
    p.add_argument("--redis-prefix", default="r2f", help="redis.key_prefix of the workers")
    p.add_argument("--jobs-exchange", default="r2f.jobs")
    p.add_argument("--events-exchange", default="r2f.events")
    p.add_argument("--id", help="the job id (default: a new one)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", default="sd3")
    p.add_argument("--mode", default="plain")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--cancel-after-progress", action="store_true",
                   help="cancel the job once its first progress event arrives")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
