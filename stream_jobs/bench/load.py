"""Background mail for the latency phase of ``make bench``, sent from its own process.

In production the background traffic reaches the broker from many mail gateways, not
from the process that times the storms. Sent from here, the 2,000 events/s no longer
share an interpreter (and its lock) with the storm probes and with the reader of
``stormguard.actions``, whose clock readings are the latency. They still share the
machine's two cores with the broker and the worker, as before.

Run as ``python -m stream_jobs.bench.load BROKER RATE SECONDS SEED`` (``stream_jobs.bench``
does). It generates every record first and prints ``ready``; a line on stdin starts
the clock; it then sends ``RATE`` records a second for ``SECONDS`` (each stamped with
the time it is sent, routed by list as ``stormguard replay`` routes) and prints one
JSON line: ``{"produced": N, "seconds": S}``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time

import msgspec


async def send_background(broker: str, rate: float, seconds: float, seed: int, linger_ms: int = 5) -> dict:
    """Send ``rate`` events/s of realistic background mail for ``seconds``; say how many went.

    aiokafka (already inside Faust) rather than kafka-python: it costs about a third of the
    CPU per record here, CPU that the broker and the worker under test would otherwise lose.
    Its default partitioner is Kafka's murmur2, as kafka-python's, so records land on the
    partitions ``stormguard replay`` would send them to.
    """
    from aiokafka import AIOKafkaProducer

    from stream_jobs.bench.traffic import realistic_events
    from stream_jobs.kafka.replay import bootstrap_servers, routing_key
    from stream_jobs.settings import EVENTS_TOPIC

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers(broker), linger_ms=linger_ms, acks=1)
    await producer.start()
    try:
        enc = msgspec.json.Encoder()
        # Generated before the clock starts: generating is not what is measured.
        background = list(itertools.islice(
            realistic_events(10**9, seed=seed, end_time=time.time() + 3600 * 24 * 365, span=1.0, storms=0),
            int(rate * seconds) + 1000))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        start = time.monotonic()
        produced = 0
        for ev in background:
            now = time.monotonic()
            if now - start >= seconds:
                break
            due = start + produced / rate
            if due > now:  # ahead: a 2 ms nap, then a small burst (as a gateway flushes its queue)
                await asyncio.sleep(max(due - now, 0.002))
            ev["timestamp"] = round(time.time(), 3)
            raw = enc.encode(ev)
            await producer.send(EVENTS_TOPIC, value=raw, key=routing_key(raw))
            produced += 1
        await producer.flush()
        return {"produced": produced, "seconds": time.monotonic() - start}
    finally:
        await producer.stop()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (4, 5):
        print("usage: python -m stream_jobs.bench.load BROKER RATE SECONDS SEED [LINGER_MS]", file=sys.stderr)
        return 2
    broker, rate, seconds, seed = args[0], float(args[1]), float(args[2]), int(args[3])
    linger_ms = int(args[4]) if len(args) == 5 else 5
    print(json.dumps(asyncio.run(send_background(broker, rate, seconds, seed, linger_ms))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
