"""Where ``stormguard policy`` learns which lists are frozen: :class:`ListStates`, kept in memory.

List state comes from the compacted ``stormguard.list-state`` topic (read from
the beginning with a kafka-python consumer on manually assigned partitions, then
kept up to date in a background thread), or from the worker's HTTP API
(``--worker-url``), cached per address. Either way a request is answered from
memory.

:class:`KafkaStateFeed` is the first source, :class:`WorkerApiSource` the second; warnings from
either (and from the policy server) are rate-limited by :data:`warn`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import urllib.parse
from collections import OrderedDict
from typing import Callable, Optional

import msgspec

from detectors.engine import ListStatus
from stream_jobs.settings import LIST_STATE_TOPIC

log = logging.getLogger("stormguard.postfix_policy")

_status_decoder = msgspec.json.Decoder(ListStatus)


class _Warn:
    """Warnings at most once per ``every`` seconds per kind, with a count of those suppressed."""

    def __init__(self, every: float = 10.0):
        self.every = every
        self.last: dict[str, tuple[float, int]] = {}

    def __call__(self, kind: str, msg: str, *args) -> None:
        now = time.monotonic()
        last, suppressed = self.last.get(kind, (-1e9, 0))
        if now - last < self.every:
            self.last[kind] = (last, suppressed + 1)
            return
        self.last[kind] = (now, 0)
        if suppressed:
            msg += f" ({suppressed} more like this not logged)"
        log.warning(msg, *args)


warn = _Warn()


class ListStates:
    """Frozen lists by lower-cased address, as the worker last published them.

    Written by one feeder (a thread or a task), read by the server; plain dict
    operations are atomic in CPython, so no lock is needed for a lookup.
    """

    def __init__(self, honour_until: bool = True, clock: Callable[[], float] = time.time):
        self.honour_until = honour_until
        self.clock = clock
        self._frozen: dict[str, ListStatus] = {}
        self.ready = threading.Event()
        self.records = 0

    def apply(self, key: Optional[bytes], value: Optional[bytes]) -> None:
        """One record of the list-state topic; a null value (tombstone) forgets its key."""
        self.records += 1
        if value is None:
            if key:
                self._frozen.pop(key.decode("utf-8", "replace").strip().lower(), None)
            return
        try:
            status = _status_decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            warn("bad-state", "ignoring a list-state record that is not a ListStatus (%s): %r", exc, value[:200])
            return
        self.set(status)

    def set(self, status: ListStatus) -> None:
        address = status.list.strip().lower()
        if status.frozen:
            if address not in self._frozen:
                log.warning("list %s is frozen (%s): mail to it is now stopped at the SMTP door",
                            address, status.reason or "no reason given")
            self._frozen[address] = status
        elif self._frozen.pop(address, None) is not None:
            log.warning("list %s is unfrozen: mail to it flows again", address)

    def frozen(self, address: str) -> Optional[ListStatus]:
        status = self._frozen.get(address)
        if status is None:
            return None
        if self.honour_until and status.until is not None and status.until <= self.clock():
            return None
        return status

    def frozen_lists(self) -> list[str]:
        return sorted(a for a in list(self._frozen) if self.frozen(a) is not None)


class KafkaStateFeed:
    """Reads ``stormguard.list-state`` from the beginning into :class:`ListStates`, then follows it.

    kafka-python consumer groups get no partitions on the embedded broker, and a
    policy server wants every record anyway, so partitions are assigned by hand
    and nothing is committed.
    """

    def __init__(self, states: ListStates, broker: Optional[str], topic: str = LIST_STATE_TOPIC,
                 poll_ms: int = 200, **consumer_options):
        self.states, self.broker, self.topic, self.poll_ms = states, broker, topic, poll_ms
        #: extra KafkaConsumer settings (the milter shortens the fetch long-poll)
        self.consumer_options = consumer_options
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="list-state-feed", daemon=True)

    def start(self) -> "KafkaStateFeed":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._consume()
                backoff = 0.5
            except Exception as exc:  # noqa: BLE001 - keep serving the last known state
                warn("feed", "list-state feed from %s failed (%s: %s); serving the last known state, retrying",
                     self.broker, type(exc).__name__, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _consume(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from stream_jobs.kafka.replay import bootstrap_servers, kafka_security

        consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers(self.broker), group_id=None,
                                 enable_auto_commit=False, auto_offset_reset="earliest",
                                 client_id="stormguard-policy", allow_auto_create_topics=False,
                                 isolation_level="read_committed",  # an exactly-once worker's aborts are not states
                                 bootstrap_timeout_ms=5000, **kafka_security(), **self.consumer_options)
        try:
            partitions = None
            while not self._stop.is_set():
                partitions = consumer.partitions_for_topic(self.topic)
                if partitions:
                    break
                if not self.states.ready.is_set():
                    # no topic yet: the worker never froze anything, which is a known, empty state
                    log.info("topic %s does not exist yet: no list is frozen", self.topic)
                    self.states.ready.set()
                self._stop.wait(1.0)
            if not partitions:
                return
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            end = consumer.end_offsets(tps)
            caught_up = all(end[tp] == 0 for tp in tps)
            while not self._stop.is_set():
                batches = consumer.poll(timeout_ms=self.poll_ms)
                for records in batches.values():
                    for rec in records:
                        self.states.apply(rec.key, rec.value)
                if not caught_up and all(consumer.position(tp) >= end[tp] for tp in tps):
                    caught_up = True
                if caught_up and not self.states.ready.is_set():
                    log.info("list state loaded from %s: %d records, %d lists frozen", self.topic,
                             self.states.records, len(self.states.frozen_lists()))
                    self.states.ready.set()
        finally:
            consumer.close()


class WorkerApiSource:
    """List state from the worker's HTTP API.

    Normally the whole set of frozen lists is polled from ``GET /api/lists``
    every ``ttl`` seconds in the background, and every answer comes from memory.
    While that poll is failing (or on a worker without that endpoint), each
    address is asked with ``GET /api/lists/{address}`` and cached: a cached
    answer younger than ``ttl`` is used as it is; an older one is used while a
    refresh runs in the background; only an address never asked before waits
    for the worker (at most ``timeout``). Errors fail open.
    """

    def __init__(self, url: str, ttl: float = 2.0, timeout: float = 0.25, max_entries: int = 100_000,
                 honour_until: bool = True):
        self.url = url.rstrip("/")
        self.ttl, self.timeout, self.max_entries = ttl, timeout, max_entries
        self.honour_until = honour_until
        self._cache: "OrderedDict[str, tuple[float, bool]]" = OrderedDict()
        self._inflight: dict[str, asyncio.Task] = {}
        self._session = None
        self._all: Optional[frozenset[str]] = None  # every frozen list, from the last good poll
        self._all_at = -1e9
        self._poller: Optional[asyncio.Task] = None

    def _client(self):
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))
        return self._session

    async def poll_once(self) -> bool:
        """One ``GET /api/lists``; True when it gave the full set of frozen lists."""
        try:
            async with self._client().get(f"{self.url}/api/lists") as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
                body = await r.json(content_type=None)
            now = time.time()
            frozen = set()
            for status in body["frozen"]:
                until = status.get("until")
                if self.honour_until and isinstance(until, (int, float)) and until <= now:
                    continue
                if status.get("frozen", True):
                    frozen.add(str(status["list"]).strip().lower())
        except Exception as exc:  # noqa: BLE001 - fall back to per-address lookups
            warn("worker-poll", "polling %s/api/lists failed (%s: %s); asking per address meanwhile",
                 self.url, type(exc).__name__, exc)
            return False
        if self._all is not None:
            for gone in self._all - frozen:
                log.warning("list %s is unfrozen: mail to it flows again", gone)
        for new in frozen - (self._all or frozenset()):
            log.warning("list %s is frozen: mail to it is now stopped at the SMTP door", new)
        self._all, self._all_at = frozenset(frozen), time.monotonic()
        return True

    async def _poll_forever(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.ttl)

    def start(self) -> "WorkerApiSource":
        """Start the background poll (needs a running event loop)."""
        if self._poller is None:
            self._poller = asyncio.ensure_future(self._poll_forever())
        return self

    async def frozen(self, address: str) -> bool:
        now = time.monotonic()
        if self._all is not None and now - self._all_at <= max(3 * self.ttl, 5.0):
            return address in self._all
        hit = self._cache.get(address)
        if hit is not None:
            if now - hit[0] > self.ttl:
                self._refresh(address)
            return hit[1]
        try:
            return await asyncio.wait_for(asyncio.shield(self._refresh(address)), self.timeout)
        except asyncio.TimeoutError:
            warn("worker-slow", "worker API did not answer for %s within %.0f ms; answering DUNNO",
                 address, self.timeout * 1000)
            return False

    def _refresh(self, address: str) -> asyncio.Task:
        task = self._inflight.get(address)
        if task is None:
            task = asyncio.ensure_future(self._fetch(address))
            self._inflight[address] = task
            task.add_done_callback(lambda t: self._inflight.pop(address, None))
        return task

    async def _fetch(self, address: str) -> bool:
        try:
            async with self._client().get(f"{self.url}/api/lists/{urllib.parse.quote(address, safe='@')}") as r:
                if r.status == 404:
                    frozen = False
                elif r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
                else:
                    body = await r.json(content_type=None)
                    frozen = bool(body.get("frozen"))
                    until = body.get("until")
                    if frozen and self.honour_until and isinstance(until, (int, float)) and until <= time.time():
                        frozen = False
        except Exception as exc:  # noqa: BLE001 - fail open, keep the last answer if any
            warn("worker-error", "worker API %s failed for %s (%s: %s); answering from cache or DUNNO",
                 self.url, address, type(exc).__name__, exc)
            hit = self._cache.get(address)
            return hit[1] if hit else False
        self._cache[address] = (time.monotonic(), frozen)
        self._cache.move_to_end(address)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return frozen

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self._session is not None:
            await self._session.close()
