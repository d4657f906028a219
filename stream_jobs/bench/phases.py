"""The bench's phases: each measures one consumer, or latency, start-up or memory, on real processes.

:class:`Bench` owns the brokers and processes of one run; :meth:`Bench.run` runs every phase in
order and returns the results (:mod:`stream_jobs.bench`, the package doc, says what each phase is).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import msgspec
from tqdm import tqdm

from stream_jobs.bench.report import LATENCY_PHASES, RATIOS, lookup, machine, say
from stream_jobs.bench.traffic import (_STORM_REPLIES, by_list_shares, describe_events, encode_all, realistic_events,
                                       sender_key)
from stream_jobs.kafka.broker import EmbeddedBroker, free_port
from stream_jobs.kafka.engines import make_broker
from stream_jobs.worker.processes import ChildProcess
from stream_jobs.settings import ACTIONS_TOPIC, EVENTS_TOPIC

ROOT = Path(__file__).resolve().parents[2]
#: How long the latency phase's background producer batches records (ms). The embedded broker
#: (Tansu, memory storage) fetches more slowly as a partition gathers batches (measured; it seems to
#: walk them on every fetch): with 5 ms batches at 2,000 events/s, a plain aiokafka consumer's
#: produce-to-read p50 went from 9 to 86 ms within 60 s, with no worker running; with 50 ms
#: batches it stayed at 8-10 ms. A real Kafka indexes offsets and has no such drift.
BACKGROUND_LINGER_MS = 50
PY = sys.executable
SCHEMA = 1


#: The stages of a freeze's latency, in order, each from the end of the one before (the latency phase's
#: breakdown; the worker's side comes from its STORMGUARD_LATENCY_TRACE lines).
STAGES: dict[str, str] = {
    "produce": "send() of the storm message to the broker's acknowledgement (producer linger 5 ms, as replay)",
    "to_worker": "acknowledged to the worker's consumer handing over the fetch that holds it (broker, fetch wait)",
    "order_hold": "held by the event-time scheduler (stream_jobs/worker/event_order.py)",
    "to_scorer": "let through to the scorer's call that holds it (the rest of the fetch is ordered first)",
    "scoring": "that call's start to the record's decision (the records before it in the call, then its own)",
    "publish": "the decision to every write of it handed to the producer (list state, table, action)",
    "to_broker": "handed to the broker's acknowledgement of the freeze (the worker's producer: one request in "
                 "flight per broker, so it may wait for the one before)",
    "to_reader": "acknowledged to the bench reading the freeze from stormguard.actions (its consumer: 5 ms fetch wait)",
}


def worker_traces(log_path: Path) -> dict[str, dict]:
    """The worker's ``latency-trace`` lines (:mod:`stream_jobs.worker.latency_trace`), by message id."""
    out: dict[str, dict] = {}
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        _, sep, payload = line.partition("latency-trace ")
        if sep:
            try:
                t = json.loads(payload)
            except ValueError:
                continue
            if t.get("message_id"):
                out[t["message_id"]] = t
    return out


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def worker_count(url: str) -> int:
    """Records a worker has scored, routed or dead-lettered, from ``/healthz`` (as cheap as the no-op's ``/count``).

    Records of the by-list topic count too: a list post routed there is two records (or more).
    """
    _, body = _get(url + "/healthz")
    return int(json.loads(body).get("records", 0))


def noop_count(url: str) -> int:
    _, body = _get(url + "/count")
    return int(json.loads(body)["count"])


def cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU seconds a process has used so far (Linux /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of a non-empty list."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def variant_turns(specs: list, rounds: int) -> Iterator[tuple[int, str, Any]]:
    """``(round, name, settings)`` of each variant in each round: the first round in the order given, then
    reversed every other round, so that no variant always runs first (a run straight after a fill was
    seen slower than its rivals, whatever it was).

    >>> [(r, name) for r, name, _ in variant_turns([("as given", {}), ("b", {}), ("c", {})], 3)]
    [(0, 'as given'), (0, 'b'), (0, 'c'), (1, 'c'), (1, 'b'), (1, 'as given'), (2, 'as given'), (2, 'b'), (2, 'c')]
    """
    for rnd in range(rounds):
        for name, env in (specs if rnd % 2 == 0 else specs[::-1]):
            yield rnd, name, env


#: The latency phase's warm-up between its cold and warm full-load runs: a storm every 0.1 s for 3 s per
#: partition, about 30 freezes per partition (fewer on some: storms land at random), each writing 350 B to
#: 1 KB to each of the small topics, past the 4 KB of a first index entry.
WARM_UP_STORM_EVERY = 0.1
WARM_UP_S_PER_PARTITION = 3.0


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="stormguard-bench-"))
        self.procs: list[ChildProcess] = []
        self.brokers: list[EmbeddedBroker] = []
        self.progress = not args.no_progress

    # -- processes ----------------------------------------------------------------------------
    def env(self, broker: EmbeddedBroker, app_id: str, web_port: int, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STORMGUARD_")}
        # STORMGUARD_PARTITIONS only matters to a worker that creates mail.events: the worker follows
        # the partition count of an existing one itself (kafka.topics.ensure_topics), and fill() has made it
        # with --partitions already, so this says the same.
        env.update(STORMGUARD_BROKER=broker.url, STORMGUARD_APP_ID=app_id, STORMGUARD_WEB_PORT=str(web_port),
                   STORMGUARD_WEB_HOST="127.0.0.1", STORMGUARD_PARTITIONS=str(self.args.partitions),
                   STORMGUARD_DATA_DIR=str(self.tmp / f"data-{app_id}"), PYTHONUNBUFFERED="1",
                   # the pre-filled topic is a backlog to catch up, not history to learn at a first start
                   STORMGUARD_LEARN_HISTORY="false", **extra)
        return env

    def worker(self, broker: EmbeddedBroker, app_id: Optional[str] = None, tree: Optional[str] = None,
               **extra: str) -> ChildProcess:
        """A worker process; with ``tree``, the worker of another checkout (a before/after in one run)."""
        port = free_port()
        app_id = app_id or f"sg-bench-{uuid.uuid4().hex[:6]}"
        head = [PY, "-m", "stream_jobs.cli"] if tree is None else \
            [PY, "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); from stream_jobs.cli import main; sys.exit(main())"]
        p = ChildProcess(head + ["run", "--broker", broker.url, "--web-port", str(port)],
                         self.tmp / f"{app_id}-{port}.log", self.env(broker, app_id, port, **extra), port, "run")
        self.procs.append(p)
        return p

    def noop(self, broker: EmbeddedBroker, **extra: str) -> ChildProcess:
        port = free_port()
        app_id = f"sg-bench-noop-{uuid.uuid4().hex[:6]}"
        p = ChildProcess([PY, "-m", "stream_jobs.bench.noop"], self.tmp / f"{app_id}.log",
                         self.env(broker, app_id, port, **extra), port, "stream_jobs.bench.noop")
        self.procs.append(p)
        return p

    def broker(self) -> EmbeddedBroker:
        """A fresh broker of the engine asked for (``--engine``): Tansu, or Apache Kafka with its full JIT
        (it runs for minutes here, so start-up is not what counts)."""
        engine = getattr(self.args, "engine", "tansu")
        kw = {}
        if engine == "kafka":
            from stream_jobs.kafka.apache import JVM_OPTS

            kw = {"jvm_opts": tuple(o for o in JVM_OPTS if "TieredStopAtLevel" not in o),
                  "data_dir": self.tmp / f"kafka-{len(self.brokers)}"}
        b = make_broker(engine, port=free_port(), log_path=self.tmp / f"broker-{len(self.brokers)}.log", **kw).start()
        self.brokers.append(b)
        return b

    def close(self) -> None:
        for p in self.procs:
            p.stop()
        for b in self.brokers:
            b.stop()

    # -- phases -------------------------------------------------------------------------------
    def fill(self, broker: EmbeddedBroker, records: list[bytes], desc: str = "fill mail.events",
             key: Optional[Callable[[bytes], Optional[bytes]]] = None) -> dict:
        """Create the topics (``--partitions``) and produce ``records`` to mail.events with kafka-python,
        keyed by ``key`` (default: as ``stormguard replay`` keys) and placed by its murmur2 partitioner."""
        from stream_jobs.kafka.replay import make_producer, routing_key
        from stream_jobs.kafka.topics import ensure_topics

        key = key or routing_key
        ensure_topics(broker.url, self.args.partitions)
        producer = make_producer(broker.url)
        started = time.perf_counter()
        try:
            with tqdm(total=len(records), unit="ev", desc=desc, disable=not self.progress,
                      file=sys.stderr) as bar:
                for raw in records:
                    producer.send(EVENTS_TOPIC, value=raw, key=key(raw))
                    bar.update(1)
                producer.flush()
        finally:
            producer.close()
        seconds = time.perf_counter() - started
        return {"events": len(records), "seconds": seconds, "events_per_s": len(records) / seconds}

    def bare_aiokafka(self, broker: EmbeddedBroker, total: int, passes: int = 3) -> dict:
        """Bare aiokafka reading and decoding every record, ``passes`` times; the median pass is reported.

        One pass over 100,000 records lasts well under a second, so one pass alone swung the worker's
        ratio to it by up to 40% between runs; every pass is kept beside the median.
        """
        runs = [asyncio.run(self._bare(broker, total)) for _ in range(passes)]
        median = sorted(runs, key=lambda r: r["events_per_s"])[len(runs) // 2]
        return dict(median, passes=len(runs), of_passes="median events/s of the passes",
                    passes_events_per_s=[r["events_per_s"] for r in runs],
                    passes_events_per_cpu_s=[r["events_per_cpu_s"] for r in runs])

    async def _bare(self, broker: EmbeddedBroker, total: int) -> dict:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        decode = msgspec.json.decode
        try:
            parts = sorted(consumer.partitions_for_topic(EVENTS_TOPIC) or [])
            if not parts:
                await consumer._client.force_metadata_update()
                parts = sorted(consumer.partitions_for_topic(EVENTS_TOPIC) or [])
            tps = [TopicPartition(EVENTS_TOPIC, p) for p in parts]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            n = 0
            first = None
            cpu = None
            with tqdm(total=total, unit="ev", desc="bare aiokafka", disable=not self.progress,
                      file=sys.stderr) as bar:
                while n < total:
                    batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
                    if first is None and batches:
                        first = time.perf_counter()
                        cpu = time.process_time()
                    got = 0
                    for records in batches.values():
                        for record in records:
                            decode(record.value)
                            got += 1
                    n += got
                    bar.update(got)
            seconds = time.perf_counter() - first
            cpu = time.process_time() - cpu
        finally:
            await consumer.stop()
        return {"events": n, "seconds": seconds, "events_per_s": n / seconds, "cpu_s": cpu,
                "events_per_cpu_s": n / cpu if cpu > 0 else float("nan"), "decoder": "msgspec.json.decode",
                "partitions": len(tps)}

    def drain(self, procs: list[ChildProcess], count: Callable[[str], int], total: int, desc: str,
              timeout: float, interval: float = 0.2) -> dict:
        """Poll the consumers' counts until together they reach ``total``; time from the first record seen.

        Throughput is (total - n0) / (t_end - t0): t0 and n0 are the time and count of the first
        poll that saw any record, t_end is interpolated between the last two polls (rate assumed
        constant within one ``interval``).
        """
        t0 = c0 = None
        prev_t, prev_n = None, 0
        deadline = time.monotonic() + timeout
        shown = 0
        with tqdm(total=total, unit="ev", desc=desc, disable=not self.progress, file=sys.stderr) as bar:
            while True:
                now = time.perf_counter()
                counts = []
                for p in procs:
                    try:
                        counts.append(count(p.url))
                    except (OSError, ValueError):
                        counts.append(0)
                n = sum(counts)
                if min(n, total) > shown:
                    bar.update(min(n, total) - shown)
                    shown = min(n, total)
                if t0 is None and n > 0:
                    t0, c0 = now, n
                    cpu0 = [cpu_seconds(p.proc.pid) for p in procs]
                if n >= total:
                    break
                prev_t, prev_n = now, n
                for p in procs:
                    if p.proc.poll() is not None:
                        raise RuntimeError(f"{p.name} died:\n{p.tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{desc}: {n}/{total} after {timeout:.0f} s:\n{procs[0].tail()}")
                # quickly until the first record shows: a fast consumer may otherwise finish within one interval
                time.sleep(interval if t0 is not None else min(interval, 0.02))
        end = now
        cpu1 = [cpu_seconds(p.proc.pid) for p in procs]
        if prev_t is not None and prev_t >= t0 and n > prev_n:
            end = prev_t + (now - prev_t) * (total - prev_n) / (n - prev_n)
        if t0 is None or end <= t0 or total - c0 <= 0:
            raise RuntimeError(f"{desc}: finished before it could be timed ({c0} of {total} at the first poll); "
                               "use more --events")
        # Let duplicates (records redelivered after a rebalance) show, if any.
        time.sleep(1.0)
        final = []
        for p in procs:
            try:
                final.append(count(p.url))
            except (OSError, ValueError):
                final.append(0)
        out = {"events": total, "seconds": end - t0, "events_per_s": (total - c0) / (end - t0),
               "timed_events": total - c0, "poll_interval_s": interval, "per_process": final,
               "duplicates": max(0, sum(final) - total)}
        if None not in cpu0 and None not in cpu1 and sum(cpu1) > sum(cpu0):
            # CPU seconds the consumer processes burnt over the timed span: less sensitive to a shared machine.
            out["cpu_s"] = sum(cpu1) - sum(cpu0)
            out["events_per_cpu_s"] = (total - c0) / out["cpu_s"]
        return out

    def run_noop(self, broker: EmbeddedBroker, total: int, stock: bool = False) -> dict:
        """The no-op agent: configured as the worker, or (``stock``) on Faust's own consumer and schema."""
        extra = {"STORMGUARD_FAST_DRAIN": "false"} if stock else {}
        p = self.noop(broker, **extra).start()
        desc = "no-op Faust agent (stock Faust)" if stock else "no-op Faust agent (worker's consumer)"
        try:
            ready = p.wait_ready()
            # /count is cheap to poll; the batch agent reads 20,000 events (--quick) in well under a second
            out = self.drain([p], noop_count, total, desc, self.args.phase_timeout, interval=0.1)
        finally:
            p.stop()
        out["ready_s"] = ready
        out["consumer"] = "stock Faust 0.15" if stock else "BatchConsumer, a batch agent (as the worker)"
        return out

    def run_workers(self, broker: EmbeddedBroker, total: int, n: int, desc: str, **extra: str) -> dict:
        app_id = f"sg-bench-x{n}-{uuid.uuid4().hex[:6]}"
        procs = [self.worker(broker, app_id=app_id, **extra) for _ in range(n)]
        for p in procs:
            p.start()
        try:
            ready = [p.wait_ready() for p in procs]
            out = self.drain(procs, worker_count, total, desc, self.args.phase_timeout, interval=0.5)
            # What one poll costs the worker it measures (it is idle now): the scrape renders every series.
            started = time.perf_counter()
            for _ in range(10):
                _get(procs[0].url + "/metrics")
            out["metrics_scrape_ms"] = (time.perf_counter() - started) * 100.0
        finally:
            for p in procs:
                p.stop()
        out["ready_s"] = ready
        out["workers"] = n
        return out

    def run_sender_keyed(self, records: list[bytes]) -> dict:
        """The worker on the same events keyed by sender: a second broker, the same partition count.

        A topic cannot be re-keyed, so the events go to a fresh embedded broker of their own,
        produced as :meth:`fill` produces them but keyed by :func:`sender_key`. Every list post
        then lands away from its list's owner and reaches it through the by-list topic: one more
        produce and consume per share, in the same worker process (so in its CPU seconds). The
        worker counts those shares as records too; the phase is timed until it has counted them
        all, and its events/s counts events of mail.events, as the list-keyed phase's does
        (records/s × events / records). Bare aiokafka on this broker is beside it, so that the two
        brokers can be compared.
        """
        n = len(records)
        shares = by_list_shares(records, sender_key, self.args.partitions)
        broker = self.broker()
        try:
            fill = self.fill(broker, records, desc="fill mail.events (keyed by sender)", key=sender_key)
            bare = self.bare_aiokafka(broker, n)
            out = self.run_workers(broker, n + shares, 1, "Stormguard worker (keyed by sender)")
        finally:
            broker.stop()
        per_event = n / (n + shares)
        out.update(records=n + shares, by_list_shares=shares, timed_records=out["timed_events"],
                   records_per_s=out["events_per_s"], events=n, timed_events=out["timed_events"] * per_event)
        out["events_per_s"] = out["timed_events"] / out["seconds"]
        if "cpu_s" in out:
            out["events_per_cpu_s"] = out["timed_events"] / out["cpu_s"]
        out.update(keyed_by="sender (the event's sender bytes; kafka-python's murmur2 partitioner)",
                   partitions=self.args.partitions, fill=fill,
                   bare_aiokafka_same_broker={k: bare[k] for k in ("events_per_s", "events_per_cpu_s")},
                   what="events of mail.events scored per second (each list post's by-list share is a "
                        "record of its own: records_per_s counts those too)")
        return out

    def run_exactly_once(self, records: list[bytes]) -> dict:
        """What ``STORMGUARD_EXACTLY_ONCE`` costs: the worker at-least-once and exactly-once on the same
        events, side by side, on Apache Kafka (the embedded broker has no transactions)."""
        from stream_jobs.kafka.apache import KAFKA_VERSION
        from stream_jobs.kafka.engines import make_broker

        n = len(records)
        broker = make_broker("kafka").start()
        self.brokers.append(broker)
        # a stock broker refuses group sessions under 6 s (group.min.session.timeout.ms)
        session = {"STORMGUARD_SESSION_TIMEOUT": "6"}
        try:
            fill = self.fill(broker, records, desc="fill mail.events (Apache Kafka)")
            alo = self.run_workers(broker, n, 1, "worker, at-least-once (Apache Kafka)", **session)
            eos = self.run_workers(broker, n, 1, "worker, exactly-once (Apache Kafka)",
                                   STORMGUARD_EXACTLY_ONCE="true", **session)
        finally:
            broker.stop()
        return {"broker": f"Apache Kafka {KAFKA_VERSION}", "partitions": self.args.partitions, "fill": fill,
                "at_least_once": alo, "exactly_once": eos}

    def deliverer(self, broker: EmbeddedBroker, dead_url: str) -> ChildProcess:
        """`stormguard deliver` with a webhook receiver and a Grafana that are both down."""
        port = free_port()
        env = self.env(broker, f"sg-bench-deliver-{uuid.uuid4().hex[:6]}", port,
                       STORMGUARD_WEBHOOK_URLS=f"down={dead_url}",
                       STORMGUARD_WEBHOOK_SECRET="whsec_" + "QkVOQ0hCRU5DSEJFTkNIQkVOQ0g=",
                       GRAFANA_URL=dead_url, GRAFANA_TOKEN="bench",
                       STORMGUARD_DELIVER_GROUP=f"sg-bench-deliver-{uuid.uuid4().hex[:6]}",
                       STORMGUARD_DELIVER_WEB_PORT=str(port), STORMGUARD_DELIVER_WEB_HOST="127.0.0.1")
        p = ChildProcess([PY, "-m", "stream_jobs.cli", "deliver", "--broker", broker.url],
                         self.tmp / f"deliver-{port}.log", env, port, "deliver")
        self.procs.append(p)
        return p

    def run_worker_with_sinks_down(self, broker: EmbeddedBroker, total: int) -> dict:
        """The worker from the start of the topic while the deliverer retries against dead receivers.

        Scoring must not wait on receivers: this phase's events/s beside the plain
        worker phase's is the proof (the ratio ``worker_sinks_down_vs_worker``).
        """
        deliver = self.deliverer(broker, f"http://127.0.0.1:{free_port()}/").start()
        try:
            out = self.run_workers(broker, total, 1, "5/5 worker, receivers down")
            try:
                status, body = _get(deliver.url + "/metrics")
            except OSError:
                status, body = 0, b""
            # -1: the deliverer's metrics could not be read (it never came up).
            failures = sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                           if line.startswith("stormguard_delivery_failures_total{")) if status == 200 else -1.0
            out["deliver_failures_during_phase"] = failures
            out["deliver_cpu_s"] = cpu_seconds(deliver.proc.pid)
        finally:
            deliver.stop()
        return out

    def offline(self, records: list[bytes]) -> tuple[dict, dict]:
        from detectors.engine import StormDetector, process_raw
        from stream_jobs.settings import policy_from_env

        # Three runs, each with a fresh detector; the best is reported (noise on a shared machine only
        # ever adds time), every run is kept.
        runs = []
        for _ in range(3):
            detector = StormDetector(policy_from_env({}))
            actions = invalid = 0
            cpu = time.process_time()
            started = time.perf_counter()
            for raw in records:
                outcome = process_raw(detector, raw)
                actions += len(outcome.actions)
                invalid += outcome.error is not None
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu
            runs.append({"events": len(records), "seconds": seconds, "events_per_s": len(records) / seconds,
                         "cpu_s": cpu, "events_per_cpu_s": len(records) / cpu, "actions": actions,
                         "invalid": invalid})
        in_process = dict(max(runs, key=lambda r: r["events_per_cpu_s"]))
        in_process["runs_events_per_cpu_s"] = [r["events_per_cpu_s"] for r in runs]
        in_process["of_runs"] = "best of 3 (each a fresh detector over every event)"

        path = self.tmp / "events.jsonl"
        path.write_bytes(b"\n".join(records) + b"\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("STORMGUARD_")}
        import resource

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run([PY, "-m", "stream_jobs.cli", "score", str(path)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cli_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        cli_actions = sum(1 for line in done.stdout.splitlines() if line.strip())
        cli = {"events": len(records), "seconds": seconds, "events_per_s": len(records) / seconds,
               "cpu_s": cli_cpu, "events_per_cpu_s": len(records) / cli_cpu, "actions": cli_actions, "includes": "interpreter start-up, file read, action lines written"}
        return in_process, cli

    def startup(self, broker: EmbeddedBroker, samples: int, **extra: str) -> tuple[dict, ChildProcess]:
        """Start the worker ``samples`` times (first with a new group, then restarts of it); keep the last."""
        app_id = f"sg-bench-live-{uuid.uuid4().hex[:6]}"
        times = []
        p = None
        for i in tqdm(range(samples), desc="start-up samples", disable=not self.progress, file=sys.stderr):
            if p is not None:
                p.stop()
            p = self.worker(broker, app_id=app_id, **extra).start()
            times.append(p.wait_ready())
        return ({"samples_s": times, "median_s": percentile(times, 50), "min_s": min(times), "max_s": max(times),
                 "what": "process start to GET /healthz 200; sample 1 is a new consumer group on a fresh broker, "
                         "the others restarts of the same group"}, p)

    def latency(self, broker: EmbeddedBroker, worker: ChildProcess, seconds: float, rate: float,
                storm_every: float, replies: int = 5) -> dict:
        """Background traffic at ``rate`` events/s; a storm on a fresh list every ``storm_every`` s.

        The background comes from :mod:`stream_jobs.bench.load`, in its own process; this one
        sends only the storms and reads the freezes.

        Each storm is a 50,000-member list never seen before, a root post from a sender never
        seen before, then (0.25 s later, 50 ms apart) ``replies`` reply-alls from different
        people. Latency is from just before the ``send()`` of the message the freeze names
        (whichever reply-all the policy froze on) to the moment that freeze is read from
        ``stormguard.actions`` (a consumer assigned to every partition, 5 ms fetch wait).
        """
        from kafka import KafkaConsumer, TopicPartition

        from stream_jobs.kafka.replay import make_producer, routing_key

        sent: dict[str, float] = {}
        acked: dict[str, float] = {}  # message id -> the broker acknowledged it (the producer's callback)
        seen: dict[str, tuple[float, float, str]] = {}  # list -> (read at, record timestamp, message id)
        stop = threading.Event()
        consumer = KafkaConsumer(bootstrap_servers=[broker.bootstrap], group_id=None, enable_auto_commit=False,
                                 fetch_max_wait_ms=5)
        parts = None
        deadline = time.monotonic() + 10
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(ACTIONS_TOPIC)
            time.sleep(0.05)
        tps = [TopicPartition(ACTIONS_TOPIC, p) for p in sorted(parts or [0])]
        consumer.assign(tps)
        consumer.seek_to_end(*tps)
        for tp in tps:
            consumer.position(tp)

        def read_actions() -> None:
            while not stop.is_set():
                for records in consumer.poll(timeout_ms=50).values():
                    now = time.time()
                    for r in records:
                        a = json.loads(r.value)
                        if a.get("kind") == "freeze" and a.get("list") and a["list"] not in seen:
                            seen[a["list"]] = (now, r.timestamp / 1000.0, a.get("message_id"))

        reader = threading.Thread(target=read_actions, daemon=True)
        reader.start()
        producer = make_producer(broker.url)
        enc = msgspec.json.Encoder()
        # Keyed by list (as replay and ingest key), a storm message is scored where it is read; keyed by sender
        # (--storm-key sender) it takes the by-list hop: routed, produced again, fetched again.
        by_sender = getattr(self.args, "storm_key", "list") == "sender"
        storm_key = sender_key if by_sender else routing_key

        def send_storm(ev: dict) -> None:
            ev["timestamp"] = round(time.time(), 3)
            raw = enc.encode(ev)
            mid = ev["message_id"]
            sent[mid] = time.time()
            producer.send(EVENTS_TOPIC, value=raw, key=storm_key(raw)).add_callback(
                lambda _meta, mid=mid: acked.__setitem__(mid, time.time()))

        # The background comes from its own process, as real traffic comes from the gateways:
        # this process only sends the storms and reads the freezes, so its clock readings are prompt.
        load = subprocess.Popen([sys.executable, "-m", "stream_jobs.bench.load", broker.url, str(rate), str(seconds),
                                 "4242", str(BACKGROUND_LINGER_MS)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            if load.stdout.readline().strip() != "ready":
                raise RuntimeError("the background traffic generator did not start")
            storms: list[tuple[str, list[str]]] = []  # (list, reply-all ids in order)
            pending: list[tuple[float, dict]] = []  # (due, event): storm messages, in due order
            base_before = worker_count(worker.url)
            load.stdin.write("go\n")
            load.stdin.flush()
            start = time.monotonic()
            next_storm = start + 1.0
            k = 0
            with tqdm(total=int(seconds), unit="s", desc=f"latency @ {rate:.0f} ev/s", disable=not self.progress,
                      file=sys.stderr) as bar:
                shown = 0
                while True:
                    now = time.monotonic()
                    elapsed = now - start
                    if elapsed >= seconds:
                        break
                    if int(elapsed) > shown:
                        bar.update(int(elapsed) - shown)
                        shown = int(elapsed)
                    if now >= next_storm:
                        next_storm += storm_every
                        k += 1
                        address = f"storm{k}-{uuid.uuid4().hex[:6]}@bench.nhs.net"
                        root = f"<storm{k}.root.{uuid.uuid4().hex[:6]}@bench>"
                        lists = {address: 50_000}
                        pending.append((now, {"message_id": root, "sender": f"tester{k}@bench-new.nhs.net",
                                              "recipients": [address], "lists": lists, "subject": f"test {k}"}))
                        ids = []
                        for j in range(replies):
                            mid = f"<storm{k}.reply{j}.{uuid.uuid4().hex[:6]}@bench>"
                            ids.append(mid)
                            pending.append((now + 0.25 + 0.05 * j, {
                                "message_id": mid, "sender": f"p{900_000 + 10 * k + j}@bench.nhs.net",
                                "recipients": [address], "lists": lists, "in_reply_to": root,
                                "subject": f"RE: test {k} - {_STORM_REPLIES[j % len(_STORM_REPLIES)]}"}))
                        storms.append((address, ids))
                        pending.sort(key=lambda item: item[0])
                    while pending and pending[0][0] <= now:
                        send_storm(pending.pop(0)[1])
                    wake = min(next_storm, pending[0][0] if pending else next_storm, start + seconds)
                    time.sleep(max(0.0, min(wake - time.monotonic(), 0.05)))
                bar.update(int(seconds) - shown)
            for _, ev in pending:  # storm messages still due: send them, so every storm is complete
                send_storm(ev)
            producer.flush()
            out, _ = load.communicate(timeout=120)
            background = json.loads(out.strip().splitlines()[-1])
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        produced = background["produced"] + len(sent)  # every storm message was sent once
        # the worker counts a by-list share as a record too: keyed by sender, each storm message is two
        records = produced + (len(sent) if by_sender else 0)
        sent_seconds = max(time.monotonic() - start, background["seconds"])
        backlog = records - (worker_count(worker.url) - base_before)
        # Wait for the worker to catch up and for the last freezes to show.
        deadline = time.monotonic() + 120
        consumed = worker_count(worker.url) - base_before
        while time.monotonic() < deadline:
            consumed = worker_count(worker.url) - base_before
            if consumed >= records:
                time.sleep(0.5)  # the last actions are published after the last record is counted
                break
            time.sleep(0.1)
        stop.set()
        reader.join(2)
        producer.close()
        consumer.close()
        visible, published, nth = [], [], []
        traces = worker_traces(worker.log_path)
        stages: dict[str, list[float]] = {name: [] for name in STAGES}
        traced: list[dict] = []  # one row per traced freeze: its stages (ms), when it was sent (s into the phase)
        sent_origin = min(sent.values()) if sent else 0.0
        for address, ids in storms:
            if address in seen and seen[address][2] in sent:
                read_at, stamped, mid = seen[address]
                visible.append((read_at - sent[mid]) * 1000.0)
                published.append((stamped - sent[mid]) * 1000.0)
                nth.append(ids.index(mid) + 1 if mid in ids else 0)
                t = traces.get(mid)
                if t is not None and mid in acked and t.get("fetched") and t.get("released") and t.get("acked"):
                    times = (sent[mid], acked[mid], t["fetched"], t["released"], t["batch_start"], t["scored"],
                             t["published"], t["acked"], read_at)
                    row = {}
                    for name, a_, b_ in zip(STAGES, times, times[1:]):
                        stages[name].append((b_ - a_) * 1000.0)
                        row[name] = round((b_ - a_) * 1000.0, 2)
                    traced.append(dict(row, total=round((read_at - sent[mid]) * 1000.0, 2),
                                       at=round(sent[mid] - sent_origin, 3), batch_len=t["batch_len"],
                                       index=t["index"]))
        if not visible:
            raise RuntimeError(f"no storm was frozen during the latency phase:\n{worker.tail()}")
        breakdown = {name: {"p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99), "max_ms": max(v),
                            "what": STAGES[name]} for name, v in stages.items() if v}
        return {
            "stages": breakdown, "stages_traced": len(stages["produce"]), "stage_samples": traced,
            "storms_keyed_by": "sender" if by_sender else "list",
            "background_target_eps": rate, "produced": produced, "produced_eps": produced / sent_seconds,
            "consumed": consumed, "backlog_when_production_stopped": backlog, "seconds": sent_seconds,
            "storms": len(storms), "frozen": len(visible),
            "p50_ms": percentile(visible, 50), "p99_ms": percentile(visible, 99), "max_ms": max(visible),
            "publish_p50_ms": percentile(published, 50), "publish_p99_ms": percentile(published, 99),
            "samples_ms": [round(v, 2) for v in visible],
            "frozen_on_reply": {str(i): nth.count(i) for i in sorted(set(nth))},
            "what": "send() of the message a freeze names to that freeze read from stormguard.actions; "
                    "storm producer linger 5 ms (as replay), actions consumer fetch wait 5 ms; background "
                    f"from its own process (stream_jobs.bench.load, aiokafka, linger {BACKGROUND_LINGER_MS} ms); "
                    "publish_* use the action record's own timestamp instead of the read time",
        }

    def latency_env(self) -> dict:
        """STORMGUARD_* settings given to the latency worker (``--latency-env``)."""
        env = {}
        for item in getattr(self.args, "latency_env", None) or []:
            name, _, value = item.partition("=")
            env[name.strip()] = value.strip()
        return env

    def latency_phases(self, results: dict) -> None:
        """Start-up, then produce->freeze latency under light and full background load, on a fresh broker."""
        a = self.args
        say("bench: fresh broker for start-up and latency")
        live = self.broker()
        from stream_jobs.kafka.topics import ensure_topics

        ensure_topics(live.url, a.partitions)
        results["startup"], sampled = self.startup(live, a.startup_samples)
        sampled.stop()
        # The latency worker first reads a day and more of history (the policy calls a list "new"
        # only once it has watched long enough), then background traffic and storms flow in real time.
        history = encode_all(realistic_events(a.history_events, seed=a.seed + 1, span=26 * 3600.0, storms=0))
        self.fill(live, history, desc="history")
        for key, value in self.latency_run(live, history, self.latency_env()).items():
            results[key] = value
        variants = getattr(a, "latency_variant", None) or []
        if variants:
            live.stop()
            # Each variant and the settings as given, in turns, each on a fresh broker filled with the same
            # history (Tansu slows as its partitions grow): a before/after side by side in one run.
            results["latency_variants"] = {"as given": [{k: results[k] for k in LATENCY_PHASES}]}
            rounds = max(1, getattr(a, "latency_rounds", 1))
            n_tp = getattr(a, "variant_throughput_events", 0) or 0
            records = encode_all(realistic_events(n_tp, seed=a.seed)) if n_tp else []
            specs = [("as given", dict(self.latency_env()))]
            for spec in variants:
                name, _, settings = spec.partition(":")
                specs.append((name, dict(self.latency_env(), **dict(
                    item.strip().split("=", 1) for item in settings.split(",") if item.strip()))))
            for rnd, name, env in variant_turns(specs, rounds):
                if records:
                    say(f"bench: throughput of {name!r} ({env}), round {rnd + 1} of {rounds}")
                    results.setdefault("throughput_variants", {}).setdefault(name, []).append(
                        self.variant_throughput(records, env))
                if rnd == 0 and name == specs[0][0]:
                    continue  # the latency phases above
                say(f"bench: latency of {name!r} ({env}), round {rnd + 1} of {rounds}")
                results["latency_variants"].setdefault(name, []).append(self.latency_run(None, history, env))

    def variant_throughput(self, records: list[bytes], env: dict) -> dict:
        """The worker with ``env`` (``tree``: another checkout's) catching up ``records`` on a fresh broker."""
        broker = self.broker()
        try:
            self.fill(broker, records, desc="fill mail.events (variant throughput)")
            out = self.run_workers(broker, len(records), 1, "Stormguard worker (variant)", **env)
        finally:
            broker.stop()
        out["worker_settings"] = env
        return out

    def latency_run(self, live: Optional[EmbeddedBroker], history: list, env: dict) -> dict:
        """A worker with ``env`` reads ``history``, then light and full load with storms; its figures.

        Without ``live``, on a fresh broker filled with ``history``, stopped afterwards."""
        a = self.args
        fresh = live is None
        if fresh:
            from stream_jobs.kafka.topics import ensure_topics

            live = self.broker()
            ensure_topics(live.url, a.partitions)
            self.fill(live, history, desc="history")
        # Storms are injected every second or so: lift the hourly freeze budget, a safety limit
        # for production, not something to measure here.
        env = dict(env)
        tree = env.pop("tree", None)
        worker = self.worker(live, tree=tree, **dict({"STORMGUARD_MAX_FREEZES_PER_HOUR": "1000000",
                                                      "STORMGUARD_LATENCY_TRACE": "true"}, **env)).start()
        worker.wait_ready()
        deadline = time.monotonic() + a.phase_timeout
        while worker_count(worker.url) < len(history):
            if time.monotonic() > deadline or worker.proc.poll() is not None:
                raise RuntimeError(f"the latency worker did not read its history:\n{worker.tail()}")
            time.sleep(0.2)
        # Light load first (queueing aside: what the pipeline itself costs), then the load asked for, twice.
        # On Apache Kafka a partition's first index entry (once its segment has taken index.interval.bytes,
        # 4 KB) costs ~55 ms of the broker's append, once per partition and segment; the topics a freeze
        # writes (one small record each) pass 4 KB during the first full-load phase, or later. Between the
        # two, storms alone, ten a second, push every partition past it ("latency_warm_up", not a figure):
        # "latency_warm" is then a running deployment, where "latency" is a new one's first freezes.
        out = {}
        for key, seconds, rate, storm_every in (
                ("latency_light", a.latency_seconds / 2, a.light_rate, a.storm_every),
                ("latency", a.latency_seconds, a.rate, a.storm_every),
                ("latency_warm_up", WARM_UP_S_PER_PARTITION * a.partitions, a.light_rate, WARM_UP_STORM_EVERY),
                ("latency_warm", a.latency_seconds, a.rate, a.storm_every)):
            cpu = cpu_seconds(worker.proc.pid)
            out[key] = self.latency(live, worker, seconds, rate, storm_every)
            after = cpu_seconds(worker.proc.pid)
            if cpu is not None and after is not None:
                out[key]["worker_cpu_s"] = after - cpu
                out[key]["worker_cpu_ms_per_1000_events"] = (after - cpu) * 1e6 / max(1, out[key]["consumed"])
        for value in out.values():
            value.update(policy_overrides={"max_freezes_per_hour": 1_000_000}, history_events=len(history),
                         history_hours=26, worker_settings=env, worker_tree=tree or str(ROOT),
                         load_avg=list(os.getloadavg()))
        worker.stop()
        if fresh:
            live.stop()
        return out

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.args
        wall = time.perf_counter()
        results: dict = {"schema": SCHEMA, "command": " ".join(["python -m stream_jobs.bench"] + sys.argv[1:]),
                         "quick": a.quick, "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                         "machine": machine(), "throughput": {}, "broker": getattr(a, "engine", "tansu")}
        if getattr(a, "only", None) == "latency":
            self.latency_phases(results)
            results["machine"]["load_avg_end"] = list(os.getloadavg())
            results["duration_s"] = time.perf_counter() - wall
            return results
        say(f"bench: generating {a.events:,} realistic events (seed {a.seed})")
        records = encode_all(realistic_events(a.events, seed=a.seed))
        results["events"] = {**describe_events(records), "partitions": a.partitions, "seed": a.seed,
                             "source": "stream_jobs.bench.traffic.realistic_events",
                             "keyed_by": "first list, else sender (stream_jobs.kafka.replay.routing_key)"}
        tp = results["throughput"]

        say("bench: offline scoring (in-process and CLI)")
        tp["offline_score"], tp["offline_score_cli"] = self.offline(records)

        say("bench: the milter's decision per message (in-process)")
        from stream_jobs.bench.milter import milter_decisions

        results["milter"] = milter_decisions(records)

        say("bench: memory per tracked sender and list (tracemalloc)")
        results["memory"] = memory(a.memory_senders, a.memory_lists, a.memory_busy_lists)

        broker = self.broker()
        say(f"bench: {results['broker']} broker at {broker.url}; filling {EVENTS_TOPIC} ({a.partitions} partitions)")
        results["fill"] = self.fill(broker, records)
        total = len(records)
        tp["bare_aiokafka"] = self.bare_aiokafka(broker, total)
        tp["faust_noop_stock"] = self.run_noop(broker, total, stock=True)
        tp["faust_noop"] = self.run_noop(broker, total)
        tp["worker"] = self.run_workers(broker, total, 1, "Stormguard worker")
        say(f"bench: second embedded broker, the same events keyed by sender ({a.partitions} partitions)")
        tp["worker_sender_keyed"] = self.run_sender_keyed(records)
        tp["two_workers"] = self.run_workers(broker, total, 2, "two Stormguard workers")
        tp["worker_sinks_down"] = self.run_worker_with_sinks_down(broker, total)
        broker.stop()
        if getattr(a, "exactly_once", False):
            say("bench: Apache Kafka, the worker at-least-once and exactly-once on the same events")
            results["exactly_once"] = self.run_exactly_once(records)

        self.latency_phases(results)

        results["ratios"] = {}
        for name, (num, den) in RATIOS.items():
            try:
                results["ratios"][name] = {"value": lookup(results, num) / lookup(results, den), "of": num, "over": den}
            except KeyError:  # a per-CPU figure this platform could not measure
                pass
        results["machine"]["load_avg_end"] = list(os.getloadavg())
        results["duration_s"] = time.perf_counter() - wall
        return results


def memory(n_senders: int, n_lists: int, n_busy: int) -> dict:
    """Bytes of detector state per tracked sender, per list (one post), per busy list (full buffers)."""
    from detectors.engine import StormDetector
    from detectors.events import MailEvent
    from detectors.policy import PolicyConfig

    t0 = 1_479_112_200.0

    def traced(feed: Callable[[StormDetector], None]) -> tuple[int, StormDetector]:
        det = StormDetector(PolicyConfig(warmup_events=0, max_freezes_per_hour=0))
        feed(det)  # warm: first-use allocations (caches, interned strings) are not per key
        det = StormDetector(PolicyConfig(warmup_events=0, max_freezes_per_hour=0))
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        feed(det)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return after - before, det

    def senders(det: StormDetector) -> None:
        for i in range(n_senders):
            det.process(MailEvent(message_id=f"m{i}", timestamp=t0 + i * 0.01, sender=f"sender{i}@bench.nhs.net",
                                  recipients=["x@bench.nhs.net"]))

    def lists(det: StormDetector) -> None:
        for i in range(n_lists):
            address = f"list{i}@bench.nhs.net"
            det.process(MailEvent(message_id=f"m{i}", timestamp=t0 + i * 0.01, sender="owner@bench.nhs.net",
                                  recipients=[address], lists={address: 200}, subject=f"bulletin {i}"))

    def busy(det: StormDetector) -> None:
        # Each list gets enough distinct posts, threads, posters and reply-alls to fill every bounded buffer.
        for i in range(n_busy):
            address = f"busy{i}@bench.nhs.net"
            for j in range(600):
                reply = j % 2 == 1
                det.process(MailEvent(
                    message_id=f"b{i}.{j}", timestamp=t0 + i * 700 + j, sender=f"poster{j % 40}@bench.nhs.net",
                    recipients=[address], lists={address: 50}, subject=f"{'RE: ' if reply else ''}topic {j // 2}",
                    in_reply_to=f"b{i}.{j - 1}" if reply else None))

    s_bytes, s_det = traced(senders)
    l_bytes, l_det = traced(lists)
    b_bytes, b_det = traced(busy)
    return {
        "senders": len(s_det.senders), "bytes_per_sender": s_bytes / len(s_det.senders),
        "lists": len(l_det.lists), "bytes_per_list": (l_bytes - 0) / len(l_det.lists),
        "busy_lists": len(b_det.lists), "bytes_per_busy_list": b_bytes / len(b_det.lists),
        "what": "tracemalloc growth of a StormDetector fed N distinct senders (direct mail), N lists with one "
                "bulletin each (one owner), and lists with 600 posts each (every bounded buffer full, "
                "40 posters whose sender state is included)",
    }
