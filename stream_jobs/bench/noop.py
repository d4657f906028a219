"""A Faust app whose agent does nothing: the framework's ceiling for ``make bench``.

It is configured exactly like the Stormguard worker (:mod:`stream_jobs.worker.app`):
the same settings from the environment, the same broker timeouts, raw
serializers on ``mail.events``, offsets from the earliest, and the worker's
consumption: a batch agent (:meth:`~stream_jobs.worker.faust_tuning.StormguardApp.batch_agent`),
or with ``STORMGUARD_FAST_DRAIN=false`` a stock Faust agent over ``stream.events()``.
The only difference is that its agent counts records instead of scoring them,
so ``worker events/s ÷ no-op events/s`` is what detection costs.

``STORMGUARD_BENCH_NOOP_MODE=take`` switches to a Faust agent over
``stream.take(500, within=0.05)`` batches, ``stream`` to one over ``stream.events()``
(Faust's own agents, on the worker's consumer).

Run as ``python -m stream_jobs.bench.noop`` (``stream_jobs.bench`` does);
``GET /count`` answers ``{"count": N}`` and ``GET /healthz`` 200 once assigned.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import faust

from stream_jobs.worker.faust_tuning import RawSchema, StormguardApp
from stream_jobs.settings import EVENTS_TOPIC, WorkerSettings

MODE = os.environ.get("STORMGUARD_BENCH_NOOP_MODE", "events")  # events (batch agent), take, stream


def create_app(settings: WorkerSettings) -> StormguardApp:
    """The no-op app: one agent that counts records, ``/count`` and ``/healthz``."""
    # Configured as the worker is; STORMGUARD_FAST_DRAIN=false gives stock Faust (the framework's own ceiling).
    app = StormguardApp.from_settings(settings)

    _raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    events_topic = app.topic(EVENTS_TOPIC, partitions=settings.partitions,
                             schema=RawSchema() if settings.fast_drain else faust.Schema(**_raw))

    _count = 0
    _ready = asyncio.Event()

    if settings.fast_drain and MODE == "events":
        @app.batch_agent(events_topic, name="stream_jobs.bench_noop.noop", max_records=500)
        async def noop_batches(events: list) -> None:  # the worker's batch path (faust_tuning.BatchConsumer)
            nonlocal _count
            _count += len(events)
    else:
        @app.agent(events_topic, name="stream_jobs.bench_noop.noop")
        async def noop(stream):
            nonlocal _count
            if MODE == "take":
                async for batch in stream.take(500, within=0.05):
                    _count += len(batch)
            else:
                async for _event in stream.events():
                    _count += 1

    @app.on_rebalance_complete.connect
    async def _on_ready(sender: Any = None, **kwargs: Any) -> None:
        _ready.set()

    @app.page("/count")
    async def count(web, request):
        return web.json({"count": _count})

    @app.page("/healthz")
    async def healthz(web, request):
        if not _ready.is_set():
            return web.json({"status": "starting"}, status=503)
        return web.json({"status": "ok", "count": _count})

    return app


def main() -> int:
    from faust.worker import Worker

    app = create_app(WorkerSettings.from_env())
    worker = Worker(app, loglevel=os.environ.get("STORMGUARD_LOG_LEVEL", "warn").lower(), quiet=True,
                    redirect_stdouts=False)
    worker.spinner = None  # as the real worker (stream_jobs/worker/serve.py): like is compared with like
    worker.execute_from_commandline()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
