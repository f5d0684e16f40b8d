#!/usr/bin/env python3
"""An r2f client: submit a job, follow its progress, wait for its result, or cancel it.

Setup (one line):  python3 -m pip install -r examples/python/requirements.txt

    python3 examples/python/client.py --prompt "a furry frog warrior" --model sd3
    python3 examples/python/client.py --prompt "..." --model sd3 --cancel-after-progress

It talks to the broker the way docs/contract.md describes, and to nothing else: the job goes to
the exchange `r2f.jobs` with its model as routing key (publisher confirms), progress events come
from the topic exchange `r2f.events`, the terminal event comes back on the client's own reply
queue (`reply_to` + `correlation_id`), and a cancel request goes to the exchange `r2f.control`
(routing key `cancel`), answered on the same reply queue. With `--tenant` (a multi-tenant fleet)
the job carries the broker user as `user_id`, progress is bound per job
(`job.progress.<tenant>.<id>`) and the reply queue is the tenant's (`r2f.reply.<tenant>.*`).
Prints one JSON line per event and exits 0 only when the job succeeded.
"""

import argparse
import asyncio
import json
import sys
import uuid

import urllib.parse

import aio_pika


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
        own = f"r2f.reply.{a.tenant}." if a.tenant else "r2f.reply."
        progress_q = await ch.declare_queue(f"{own}{uuid.uuid4().hex}", exclusive=True,
                                            auto_delete=True)
        key = f"job.progress.{a.tenant}.{job_id}" if a.tenant else f"job.progress.{job_id}"
        await progress_q.bind(events, routing_key=key)
        # The terminal event and the cancel answer: on our own reply queue. Workers answer only
        # queues named like a client's (r2f.reply.* — r2f.reply.<tenant>.* for a tenant —,
        # direct reply-to); aio-pika names anonymous queues itself (amq_...), so this one is
        # named explicitly.
        reply_q = await ch.declare_queue(f"{own}{uuid.uuid4().hex}", exclusive=True,
                                         auto_delete=True)
        # A tenant's messages carry its broker user, which RabbitMQ checks.
        user = urllib.parse.unquote(urllib.parse.urlparse(a.amqp).username or "guest")
        user_id = user if a.tenant else None
        jobs = await ch.get_exchange(a.jobs_exchange, ensure=False)
        await jobs.publish(
            aio_pika.Message(
                json.dumps(job).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=job_id,
                correlation_id=job_id,
                reply_to=reply_q.name,
                user_id=user_id,
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
                    # The worker stops at its next denoising step; the answer comes back on
                    # our reply queue.
                    control = await ch.get_exchange(a.control_exchange, ensure=False)
                    await control.publish(
                        aio_pika.Message(json.dumps({"id": job_id}).encode(),
                                         content_type="application/json",
                                         correlation_id=f"cancel-{job_id}",
                                         reply_to=reply_q.name, user_id=user_id),
                        routing_key="cancel")

        async def on_reply(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with msg.process():
                if msg.correlation_id == f"cancel-{job_id}":
                    print(json.dumps({"cancel": json.loads(msg.body)}), flush=True)
                elif msg.correlation_id == job_id and not result.done():
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
    p.add_argument("--jobs-exchange", default="r2f.jobs")
    p.add_argument("--control-exchange", default="r2f.control")
    p.add_argument("--tenant", help="this broker user's tenant (a multi-tenant fleet)")
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
