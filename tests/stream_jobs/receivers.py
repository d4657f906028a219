"""Real receivers on loopback for the delivery tests: no mocks, real HTTP servers.

* :class:`WebhookReceiver`: an Alertmanager-style webhook endpoint that verifies
  every request with ``standardwebhooks.Webhook(secret).verify`` (401 if not),
  records the verified payloads and drops duplicates by ``webhook-id``.
* :class:`FakeGrafana`: a server following Grafana's documented annotations API
  (``POST /api/annotations`` → ``{"id", "message"}``, ``GET /api/annotations``
  with ``tags``/``type``/``dashboardUID``/``limit``, ``PATCH /api/annotations/:id``
  with Grafana's patch semantics, bearer token required).
* :class:`RecordingServer`: records any request (generic HTTP sink).

Each runs its own event loop in a thread, so a test can take it down and bring
it back on the same port while a ``stormguard deliver`` process keeps retrying.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Callable, Optional

from aiohttp import web

from stream_jobs.kafka.broker import free_port


def stop_group(proc, timeout: float = 20.0) -> None:
    """SIGTERM a server's whole process group, SIGKILL it if it has not gone within ``timeout``."""
    import os
    import signal
    import subprocess

    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class _ThreadedServer:
    def __init__(self, port: Optional[int] = None):
        self.port = port or free_port()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runner: Optional[web.AppRunner] = None
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:  # pragma: no cover - abstract
        raise NotImplementedError

    def start(self) -> "_ThreadedServer":
        ready = threading.Event()
        errors: list = []

        def _run():
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def _up():
                self._runner = web.AppRunner(self.app(), access_log=None)
                await self._runner.setup()
                await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

            try:
                loop.run_until_complete(_up())
            except Exception as exc:  # pragma: no cover
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=_run, daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate():
                    return True
            time.sleep(0.05)
        with self.lock:
            return predicate()


class WebhookReceiver(_ThreadedServer):
    """Verifies Standard Webhooks signatures; keeps payloads by webhook-id."""

    def __init__(self, secret: str, port: Optional[int] = None, status: int = 204):
        super().__init__(port)
        from standardwebhooks import Webhook

        self.verifier = Webhook(secret)
        self.status = status
        self.by_id: dict[str, dict] = {}
        self.order: list[str] = []
        self.duplicates = 0
        self.rejected = 0
        self.headers: dict[str, dict] = {}

    def app(self) -> web.Application:
        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            headers = {k.lower(): v for k, v in request.headers.items()}
            try:
                payload = self.verifier.verify(body, headers)
            except Exception:
                with self.lock:
                    self.rejected += 1
                return web.json_response({"error": "bad signature"}, status=401)
            msg_id = headers["webhook-id"]
            with self.lock:
                if msg_id in self.by_id:
                    self.duplicates += 1
                else:
                    self.by_id[msg_id] = payload
                    self.order.append(msg_id)
                    self.headers[msg_id] = headers
            return web.Response(status=self.status)

        app = web.Application()
        app.router.add_post("/hook", hook)
        return app

    @property
    def hook_url(self) -> str:
        return self.url + "/hook"


class FakeGrafana(_ThreadedServer):
    """Grafana's annotations HTTP API, as documented (and as Grafana's own handlers behave)."""

    def __init__(self, token: str, port: Optional[int] = None):
        super().__init__(port)
        self.token = token
        self.annotations: dict[int, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.unauthorized = 0
        self._next_id = 1

    def _auth(self, request: web.Request) -> bool:
        ok = request.headers.get("Authorization") == f"Bearer {self.token}"
        if not ok:
            with self.lock:
                self.unauthorized += 1
        return ok

    def app(self) -> web.Application:
        async def create(request: web.Request) -> web.Response:
            if not self._auth(request):
                return web.json_response({"message": "Unauthorized"}, status=401)
            body = await request.json()
            if not isinstance(body.get("time"), int) or not isinstance(body.get("tags", []), list):
                return web.json_response({"message": "bad request"}, status=400)
            with self.lock:
                ann_id = self._next_id
                self._next_id += 1
                self.annotations[ann_id] = {
                    "id": ann_id, "dashboardUID": body.get("dashboardUID") or "", "panelId": body.get("panelId") or 0,
                    "time": body["time"], "timeEnd": body.get("timeEnd") or body["time"],
                    "tags": list(body.get("tags") or []), "text": body.get("text") or "", "type": "annotation"}
                self.requests.append(("POST", request.path_qs))
            return web.json_response({"message": "Annotation added", "id": ann_id})

        async def find(request: web.Request) -> web.Response:
            if not self._auth(request):
                return web.json_response({"message": "Unauthorized"}, status=401)
            q = request.query
            tags = q.getall("tags", [])
            match_any = q.get("matchAny", "false") == "true"
            limit = int(q.get("limit", 100))
            out = []
            with self.lock:
                self.requests.append(("GET", request.path_qs))
                for a in self.annotations.values():
                    if tags:
                        have = set(a["tags"])
                        if (match_any and not have & set(tags)) or (not match_any and not set(tags) <= have):
                            continue
                    if q.get("dashboardUID") and a["dashboardUID"] != q["dashboardUID"]:
                        continue
                    if q.get("from") and q.get("to") and not (a["time"] <= int(q["to"]) and a["timeEnd"] >= int(q["from"])):
                        continue
                    out.append(dict(a))
            out.sort(key=lambda a: (a["time"], a["timeEnd"]), reverse=True)
            return web.json_response(out[:limit])

        async def patch(request: web.Request) -> web.Response:
            if not self._auth(request):
                return web.json_response({"message": "Unauthorized"}, status=401)
            ann_id = int(request.match_info["id"])
            body = await request.json()
            with self.lock:
                self.requests.append(("PATCH", request.path_qs))
                a = self.annotations.get(ann_id)
                if a is None:
                    return web.json_response({"message": "Could not find annotation to update"}, status=404)
                # Grafana's PatchAnnotation: a non-null tags list replaces the tags; empty text / zero times keep.
                if body.get("tags") is not None:
                    a["tags"] = list(body["tags"])
                if body.get("text"):
                    a["text"] = body["text"]
                if (body.get("time") or 0) > 0:
                    a["time"] = body["time"]
                if (body.get("timeEnd") or 0) > 0:
                    a["timeEnd"] = body["timeEnd"]
            return web.json_response({"message": "Annotation patched"})

        async def health(request: web.Request) -> web.Response:
            return web.json_response({"database": "ok", "version": "11.0.0-fake"})

        app = web.Application()
        app.router.add_post("/api/annotations", create)
        app.router.add_get("/api/annotations", find)
        app.router.add_patch("/api/annotations/{id:\\d+}", patch)
        app.router.add_get("/api/health", health)
        return app


class RecordingServer(_ThreadedServer):
    """Answers every request with ``status`` and records (method, path_qs, headers, body)."""

    def __init__(self, status: int = 200, port: Optional[int] = None):
        super().__init__(port)
        self.status = status
        self.requests: list[dict] = []

    def app(self) -> web.Application:
        async def any_request(request: web.Request) -> web.Response:
            body = await request.read()
            with self.lock:
                self.requests.append({"method": request.method, "path": request.path_qs,
                                      "headers": {k.lower(): v for k, v in request.headers.items()},
                                      "body": json.loads(body) if body else None})
            return web.json_response({}, status=self.status)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", any_request)
        return app


class MailmanCore:
    """A real GNU Mailman 3 core (SQLite, REST API on a free loopback port), from ``.venv-mailman``.

    ``deploy/mailman/install.sh`` installs it (idempotent). Only the REST runner
    is started: the tests need list settings, not mail flow. The master runs in
    the foreground in its own session, so stopping it ends its runners too.
    """

    def __init__(self, root, tmp):
        import os
        import secrets

        self.root, self.tmp = root, tmp
        self.venv = os.environ.get("MAILMAN_VENV") or str(root / ".venv-mailman")
        self.port = free_port()
        self.user = "restadmin"
        self.password = secrets.token_urlsafe(12)
        self.proc = None
        self.cfg = tmp / "mailman.cfg"
        self.log_path = tmp / "mailman-master.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def install(self) -> None:
        import subprocess

        subprocess.run(["sh", str(self.root / "deploy/mailman/install.sh")], check=True,
                       env={**__import__("os").environ, "MAILMAN_VENV": self.venv}, timeout=600)

    def write_config(self) -> None:
        off = "".join(f"[runner.{name}]\nstart: no\n\n" for name in
                      ("archive", "bounces", "command", "digest", "in", "lmtp", "out", "pipeline", "retry",
                       "virgin", "task", "nntp"))
        self.cfg.write_text(f"""[mailman]
layout: stormguard
site_owner: postmaster@example.com

[paths.stormguard]
var_dir: {self.tmp / 'var'}

[webservice]
hostname: 127.0.0.1
port: {self.port}
admin_user: {self.user}
admin_pass: {self.password}
workers: 1

[mta]
smtp_host: 127.0.0.1
smtp_port: {free_port()}
lmtp_host: 127.0.0.1
lmtp_port: {free_port()}

{off}""")

    def start(self, timeout: float = 60.0) -> "MailmanCore":
        import subprocess
        import urllib.request

        if not self.cfg.exists():
            self.write_config()
        log = open(self.log_path, "ab")
        # `mailman --run-as-root start` would daemonise the same master; running it in the foreground
        # lets the test own (and stop) exactly this process and its runners.
        self.proc = subprocess.Popen([f"{self.venv}/bin/master", "-C", str(self.cfg), "--force"],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=self.tmp)
        log.close()
        deadline = time.monotonic() + timeout
        req = urllib.request.Request(self.url + "/3.1/system/versions")
        import base64

        req.add_header("Authorization", "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode())
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mailman master exited {self.proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(req, timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"Mailman REST not up after {timeout} s: {self.log()}")

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None

    def client(self):
        from mailmanclient import Client

        return Client(self.url + "/3.1", self.user, self.password)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


class Alertmanager:
    """Debian's real ``prometheus-alertmanager`` (0.25) on free loopback ports, its data in ``tmp``.

    Clustering is off (``--cluster.listen-address=``); the configuration is written
    by the caller (``config``: YAML text). ``make install`` installs the package.
    """

    def __init__(self, tmp, config: str, name: str = "alertmanager", web_config: Optional[str] = None,
                 scheme: str = "http"):
        self.tmp = tmp
        self.port = free_port()
        self.config_path = tmp / f"{name}.yml"
        self.config_path.write_text(config)
        self.web_config_path = None
        if web_config is not None:
            self.web_config_path = tmp / f"{name}-web.yml"
            self.web_config_path.write_text(web_config)
        self.storage = tmp / f"{name}-data"
        self.log_path = tmp / f"{name}.log"
        self.scheme = scheme
        self.proc = None

    @staticmethod
    def binary() -> str:
        import shutil

        path = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        if path is None:
            raise AssertionError("prometheus-alertmanager is not installed (make install installs it)")
        return path

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "Alertmanager":
        import subprocess
        import urllib.request

        args = [self.binary(), f"--config.file={self.config_path}", f"--storage.path={self.storage}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=", "--log.level=warn"]
        if self.web_config_path is not None:
            args.append(f"--web.config.file={self.web_config_path}")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"alertmanager exited {self.proc.returncode}: {self.log()}")
            if self.web_config_path is not None:  # TLS/auth: the caller checks readiness its own way
                import socket

                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return self
                except OSError:
                    time.sleep(0.1)
                    continue
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"alertmanager not ready after {timeout} s: {self.log()}")

    def api(self, path: str, body=None, method: Optional[str] = None):
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + "/api/v2/" + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=5) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def alerts(self, **filters) -> list[dict]:
        from urllib.parse import urlencode

        query = urlencode([("filter", f'{k}="{v}"') for k, v in filters.items()])
        return self.api("alerts" + (f"?{query}" if query else ""))

    def silence(self, matchers: dict, comment: str = "planned", seconds: float = 3600) -> str:
        from datetime import datetime, timedelta, timezone

        now = datetime.now(timezone.utc)
        body = {"matchers": [{"name": k, "value": v, "isRegex": False, "isEqual": True} for k, v in matchers.items()],
                "startsAt": now.isoformat(), "endsAt": (now + timedelta(seconds=seconds)).isoformat(),
                "createdBy": "stormguard-test", "comment": comment}
        return self.api("silences", body, method="POST")["silenceID"]

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def alertmanager_config(webhook_url: str, group_wait: str = "2s", group_interval: str = "2s",
                        repeat_interval: str = "1h") -> str:
    """An Alertmanager configuration routing Stormguard's alerts, grouped by list, to one webhook."""
    return f"""route:
  receiver: on-call
  group_by: [list]
  group_wait: {group_wait}
  group_interval: {group_interval}
  repeat_interval: {repeat_interval}
receivers:
  - name: on-call
    webhook_configs:
      - url: {webhook_url}
        send_resolved: true
"""


def example_alertmanager_config(webhook_url: str, group_wait: str = "10s", group_interval: str = "3s") -> str:
    """deploy/alertmanager/alertmanager.yml as shipped, its storm receiver pointed at ``webhook_url``
    and its storm route's timers shortened (a change to a group is notified within ``group_interval``)."""
    from pathlib import Path

    import yaml

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy/alertmanager/alertmanager.yml").read_text())
    for receiver in doc["receivers"]:
        if receiver["name"] == "mail-on-call":
            receiver["webhook_configs"] = [{"url": webhook_url, "send_resolved": True}]
    for route in doc["route"]["routes"]:
        if route["receiver"] == "mail-on-call":
            route["group_wait"] = group_wait  # the storm is replayed in seconds; keep the test short
            route["group_interval"] = group_interval
    return yaml.safe_dump(doc)
