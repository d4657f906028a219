"""Held mail, released or discarded by thread: the milter's journal, Postfix's hold queue, Mailman's held posts.

``stormguard milter`` journals every message it quarantines (queue id, list, the held thread, its
In-Reply-To and References ids) in ``<state dir>/holds.jsonl``. From that journal:

* when a list unfreezes (cool-down or operator), its held mail *outside* the storm thread is released
  (``postsuper -H``); the storm thread's replies stay held for a moderator, or are released too
  (``--release-storm-thread``);
* a thread hold that ended without a freeze (the anomalous post drew no reply-all in time, or the
  freeze was refused by ``max_freezes_per_hour``) releases what it held;
* an operator releases or discards one thread's (or one list's) held mail in bulk through the
  milter's admin API: ``POST /api/holds/release`` or ``/api/holds/discard`` with
  ``{"list": ..., "thread": <root message-id>, "actor": ..., "reason": ...}``;
* the same for Mailman's held posts (``POST /api/mailman/release|discard``), through its REST
  held-message API: one request per held post is made by Stormguard, not by a moderator.

Every release and discard is published on ``stormguard.actions`` as an action (``release`` or
``discard``) with its actor and reason, as freezes are.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from detectors.holds import Hold, HoldBook, message_ids, normalise_id
from detectors.policy import Action, ThreadHold, encode_action
from stream_jobs.postfix.list_state import warn
from stream_jobs.settings import secret

log = logging.getLogger("stormguard.milter")

#: The past tense of each verb, for journals and answers.
DONE = {"release": "released", "discard": "discarded"}
#: Released messages scheduled one by one (``postqueue -i``) at most; more: ``postqueue -f`` once.
MAX_ONE_BY_ONE = 200
#: How often ended thread holds are looked for (seconds).
SWEEP_EVERY = 15.0


class PostfixError(RuntimeError):
    pass


class Postfix:
    """The hold queue of one Postfix instance: list it (``postqueue -j``), release or delete (``postsuper``)."""

    def __init__(self, config_dir: Optional[str] = None, postqueue: str = "postqueue", postsuper: str = "postsuper"):
        self.config_dir = config_dir
        self.postqueue_bin, self.postsuper_bin = _binary(postqueue), _binary(postsuper)

    def _conf(self) -> list[str]:
        return ["-c", self.config_dir] if self.config_dir else []

    def held(self) -> set[str]:
        """Queue ids in the hold queue now."""
        out = subprocess.run([self.postqueue_bin, *self._conf(), "-j"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise PostfixError(f"postqueue -j failed: {out.stderr.strip()[:300]}")
        ids = set()
        for line in out.stdout.splitlines():
            if line.strip():
                entry = json.loads(line)
                if entry.get("queue_name") == "hold":
                    ids.add(entry["queue_id"])
        return ids

    def postsuper(self, verb: str, queue_ids: Iterable[str]) -> None:
        """``postsuper -H -`` (release) or ``-d -`` (delete), the queue ids on standard input."""
        flag = {"release": "-H", "discard": "-d"}[verb]
        ids = "".join(f"{q}\n" for q in queue_ids)
        if not ids:
            return
        out = subprocess.run([self.postsuper_bin, *self._conf(), flag, "-"], input=ids, capture_output=True,
                             text=True, timeout=120)
        if out.returncode != 0:
            raise PostfixError(f"postsuper {flag} failed: {out.stderr.strip()[:300]}")
        if verb == "release":
            # postsuper -H moves mail to the deferred queue, tried again at the next queue run (up to
            # queue_run_delay, 300 s): ask for each one now (a big release flushes the deferred queue once)
            ids_list = ids.split()
            commands = [[self.postqueue_bin, *self._conf(), "-i", q] for q in ids_list] \
                if len(ids_list) <= MAX_ONE_BY_ONE else [[self.postqueue_bin, *self._conf(), "-f"]]
            for command in commands:
                subprocess.run(command, capture_output=True, timeout=60)


def _binary(name: str) -> str:
    import shutil

    return shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else name)


class HeldMail:
    """The journal of what the milter held, and releases by thread or list."""

    def __init__(self, state_dir: str, postfix: Postfix, book: HoldBook, producer=None,
                 actions_topic: str = "stormguard.actions", release_storm_thread: bool = False):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "holds.jsonl"
        self.postfix, self.book = postfix, book
        self.producer, self.actions_topic = producer, actions_topic
        self.release_storm_thread = release_storm_thread
        #: queue id -> journal entry, for mail still held
        self.entries: dict[str, dict] = {}
        self._load()

    # -- the journal ------------------------------------------------------------------------
    def _load(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a torn last line after a crash
                if entry.get("state") == "held":
                    self.entries[entry["queue_id"]] = entry
                else:
                    self.entries.pop(entry.get("queue_id"), None)
        # compacted at each start: what is still held, nothing of what was released or discarded
        fresh = self.path.with_suffix(".tmp")
        with open(fresh, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(e, separators=(",", ":")) + "\n" for e in self.entries.values())
        os.replace(fresh, self.path)

    def _append(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def record(self, seen, event, hold: Hold) -> None:
        """One message quarantined by the milter."""
        if not seen.queue_id:
            warn("held-noid", "held a message without a queue id (macro i); it cannot be released by thread")
            return
        entry = {"queue_id": seen.queue_id, "state": "held", "at": time.time(), "list": hold.list, "kind": hold.kind,
                 "root": hold.root, "message_id": event.message_id if event is not None else None,
                 "refs": seen.refs, "sender": seen.sender}
        self.entries[seen.queue_id] = entry
        self._append(entry)

    def in_thread(self, entry: dict, address: str, root: str) -> bool:
        root = normalise_id(root)
        return entry.get("root") == root or root in entry.get("refs", ()) \
            or self.book.in_thread(address, root, entry.get("refs", ()))

    def select(self, address: str, thread: Optional[str] = None) -> list[dict]:
        address = address.strip().lower()
        return [e for e in self.entries.values() if e["list"] == address
                and (thread is None or self.in_thread(e, address, thread))]

    def summary(self) -> list[dict]:
        """Held mail by list and thread, for an operator."""
        groups: dict[tuple, int] = {}
        for e in self.entries.values():
            key = (e["list"], e.get("root"))
            groups[key] = groups.get(key, 0) + 1
        return [{"list": k[0], "thread": f"<{k[1]}>" if k[1] else None, "held": n}
                for k, n in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))]

    # -- releases ---------------------------------------------------------------------------
    async def act(self, verb: str, entries: list[dict], address: str, thread: Optional[str], actor: str,
                  reason: str) -> dict:
        """Release or discard these held messages (those still in the hold queue), journal it, publish the action."""
        if verb not in ("release", "discard"):
            raise ValueError(f"unknown verb {verb!r}: release or discard")
        loop = asyncio.get_running_loop()
        in_queue = await loop.run_in_executor(None, self.postfix.held) if entries else set()
        ids = sorted(e["queue_id"] for e in entries if e["queue_id"] in in_queue)
        gone = [e["queue_id"] for e in entries if e["queue_id"] not in in_queue]
        if ids:
            await loop.run_in_executor(None, self.postfix.postsuper, verb, ids)
        now = time.time()
        for qid in ids + gone:  # mail no longer in the hold queue was released or deleted by hand
            self.entries.pop(qid, None)
            self._append({"queue_id": qid, "state": DONE[verb] if qid in ids else "gone", "at": now, "actor": actor})
        result = {"list": address, "thread": thread, DONE[verb]: len(ids), "queue_ids": ids, "gone": len(gone)}
        if ids:
            self.publish(verb, address, thread, actor, f"{reason} ({len(ids)} message(s))", now)
            log.warning("%s %d held message(s) of %s%s: %s (%s)", "released" if verb == "release" else "discarded",
                        len(ids), address, f" thread {thread}" if thread else "", reason, actor)
        return result

    def publish(self, verb: str, address: str, thread: Optional[str], actor: str, reason: str, at: float) -> None:
        if self.producer is None:
            return
        action = Action(kind=verb, list=address, sender=None, event_time=round(at, 3), detector="operator"
                        if actor != "stormguard" else "release", score=0.0, message_id=thread, reason=reason,
                        actor=actor, thread=ThreadHold(root=thread, ids=[thread]) if thread else None)
        try:
            self.producer.send(self.actions_topic, key=address.encode(), value=encode_action(action))
        except Exception as exc:  # noqa: BLE001 - the release happened; say so in the log at least
            warn("held-publish", "could not publish the %s action of %s: %s", verb, address, exc)

    async def after_unfreeze(self, address: str) -> dict:
        """A list unfroze: release its held mail outside the storm thread; the storm's stays held (or not)."""
        storm = self.book.storm_thread(address)
        now = time.time()
        # a post held before expansion (pre-send hold) waits for a moderator whatever the list does, and a
        # reply into another thread whose hold still runs stays held until that hold ends (the sweep)
        entries = [e for e in self.select(address) if e["kind"] != "presend"
                   and self.book.decide([address], e.get("refs", ()), now) is None]
        if storm is None:
            outside, inside = entries, []
        else:
            root, ids = storm
            inside = [e for e in entries if e.get("root") == root or ids.intersection(e.get("refs", ()))]
            outside = [e for e in entries if e not in inside]
        result = await self.act("release", outside, address, None, "stormguard",
                                "list unfrozen: held mail outside the storm thread is released")
        if inside and self.release_storm_thread:
            result["storm"] = await self.act("release", inside, address, f"<{storm[0]}>", "stormguard",
                                             "list unfrozen: the storm thread's replies are released "
                                             "(STORMGUARD_MILTER_RELEASE_STORM_THREAD)")
        elif inside:
            log.warning("list %s unfrozen: %d held repl(ies) into the storm thread <%s> stay held for a moderator "
                        "(POST /api/holds/release or /discard)", address, len(inside), storm[0])
        return result

    async def reconcile(self) -> None:
        """At start-up, once the topics are read: lists unfrozen while the milter was away release their mail."""
        for address in sorted({e["list"] for e in self.entries.values() if e["kind"] == "list"}):
            if not self.book.frozen(address, time.time()):
                await self.after_unfreeze(address)

    async def sweep(self, now: Optional[float] = None) -> int:
        """Release what thread holds held when the hold ended without a freeze; returns how many."""
        now = time.time() if now is None else now
        released = 0
        by_thread: dict[tuple, list[dict]] = {}
        for e in list(self.entries.values()):
            if e["kind"] != "thread" or self.book.frozen(e["list"], now):
                continue
            storm = self.book.storm_thread(e["list"])
            if storm is not None and storm[0] == e.get("root"):
                continue  # a storm's thread: an operator decides
            if self.book.decide([e["list"]], e.get("refs", ()), now) is None:
                by_thread.setdefault((e["list"], e.get("root")), []).append(e)
        for (address, root), entries in by_thread.items():
            result = await self.act("release", entries, address, f"<{root}>" if root else None, "stormguard",
                                    "thread hold ended without a freeze")
            released += result["released"]
        return released


# -- Mailman's held posts -------------------------------------------------------------------------


def mailman_bulk(url: str, user: str, password: Optional[str], address: str, verb: str,
                 thread_ids: Optional[set[str]] = None) -> dict:
    """Accept or discard a Mailman list's held posts (those of one thread, if ``thread_ids`` is given).

    A held post is in the thread when its Message-ID, In-Reply-To or References names one of
    ``thread_ids`` (normalised). Blocking (mailmanclient): run it in an executor.
    """
    import email

    from mailmanclient import Client

    from stream_jobs.actions.sinks.mailman import rest_base

    action = {"release": "accept", "discard": "discard"}[verb]
    mlist = Client(rest_base(url), user, password).get_list(address)
    done, kept = [], 0
    for held in list(mlist.held):
        if thread_ids is not None:
            msg = email.message_from_string(held.msg or "")
            ids = {normalise_id(held.message_id or "")} | set(message_ids(msg.get("In-Reply-To"))) \
                | set(message_ids(msg.get("References")))
            if not ids & thread_ids:
                kept += 1
                continue
        mlist.moderate_message(held.request_id, action)
        done.append(held.message_id)
    return {"list": address, DONE[verb]: len(done), "message_ids": done, "not_in_thread": kept}


# -- the admin API ----------------------------------------------------------------------------------


async def sweep_forever(held: HeldMail, every: float = SWEEP_EVERY) -> None:
    """Release, now and then, what thread holds that ended without a freeze had held."""
    while True:
        await asyncio.sleep(every)
        try:
            await held.sweep()
        except Exception as exc:  # noqa: BLE001 - retried at the next sweep
            warn("held-sweep", "releasing ended thread holds failed: %s: %s", type(exc).__name__, exc)


async def serve_admin(listen: str, held: HeldMail, decider, server) -> Any:
    """``/healthz``, ``GET /api/holds``, ``POST /api/holds/{release,discard}``, ``POST /api/mailman/{...}``."""
    from aiohttp import web

    from stream_jobs.postfix.policy import split_listen

    book = held.book

    async def healthz(request):
        return web.json_response({"status": "ok", "counts": decider.counts, "frozen": book.frozen_lists(time.time()),
                                  "held": len(held.entries), "threads": len(book.threads()),
                                  "decide_ms": server.decide_ms() if server is not None else None})

    async def holds(request):
        return web.json_response({"frozen": book.frozen_lists(time.time()), "threads": book.threads(),
                                  "held": held.summary()})

    async def body_of(request) -> dict:
        token = secret("STORMGUARD_ADMIN_TOKEN")
        if not token:
            raise web.HTTPForbidden(text=json.dumps({"error": "admin API disabled: set STORMGUARD_ADMIN_TOKEN"}),
                                    content_type="application/json")
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise web.HTTPUnauthorized(text=json.dumps({"error": "missing or wrong bearer token"}),
                                       content_type="application/json")
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            raise web.HTTPBadRequest(text=json.dumps({"error": "body is not JSON"}), content_type="application/json")
        if not isinstance(body, dict) or not isinstance(body.get("list"), str) or not body["list"].strip():
            raise web.HTTPBadRequest(text=json.dumps({"error": 'body must be a JSON object with "list"'}),
                                     content_type="application/json")
        verb = request.match_info["verb"]
        if verb not in ("release", "discard"):
            raise web.HTTPNotFound(text=json.dumps({"error": f"unknown action {verb!r}: use release or discard"}),
                                   content_type="application/json")
        return body

    def who(body: dict, verb: str) -> tuple[str, str]:
        actor = str(body.get("actor") or "operator")[:200]
        return actor, str(body.get("reason") or f"{verb} by {actor}")[:1000]

    async def postfix_holds(request):
        body = await body_of(request)
        verb = request.match_info["verb"]
        address, thread = body["list"].strip().lower(), body.get("thread")
        actor, reason = who(body, verb)
        try:
            result = await held.act(verb, held.select(address, thread), address, thread, actor, reason)
        except PostfixError as exc:
            return web.json_response({"error": str(exc)}, status=502)
        return web.json_response(result)

    async def mailman_holds(request):
        body = await body_of(request)
        verb = request.match_info["verb"]
        url = os.environ.get("STORMGUARD_MAILMAN_URL")
        if not url:
            return web.json_response({"error": "set STORMGUARD_MAILMAN_URL (and _USER, _PASSWORD)"}, status=400)
        address, thread = body["list"].strip().lower(), body.get("thread")
        ids = None
        if thread:
            ids = {normalise_id(thread)} | book.thread_ids(address, thread)
        actor, reason = who(body, verb)
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                None, mailman_bulk, url, os.environ.get("STORMGUARD_MAILMAN_USER") or "restadmin",
                secret("STORMGUARD_MAILMAN_PASSWORD"), address, verb, ids)
        except Exception as exc:  # noqa: BLE001 - Mailman's answer, passed on
            return web.json_response({"error": f"Mailman: {type(exc).__name__}: {exc}"}, status=502)
        if result[DONE[verb]]:
            held.publish(verb, address, thread, actor, f"{reason} (Mailman: {result[DONE[verb]]} post(s))",
                         time.time())
        return web.json_response(result)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/holds", holds)
    app.router.add_post("/api/holds/{verb}", postfix_holds)
    app.router.add_post("/api/mailman/{verb}", mailman_holds)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = split_listen(listen)
    await web.TCPSite(runner, host, port).start()

    return runner
