"""Mailman's held posts released or discarded by thread, in bulk, through the milter's admin API.

A real Mailman 3 core (``tests.stream_jobs.receivers.MailmanCore``): a list under emergency
moderation (what a freeze sets), three posts injected and run through its ``in`` runner, so they
are held as Mailman holds them; then one call discards the storm thread's posts (matched by
Message-ID, In-Reply-To, References) and another accepts the rest.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from detectors.holds import HoldBook
from detectors.policy import ThreadHold
from stream_jobs.kafka.broker import free_port
from tests.conftest import http_json

pytestmark = pytest.mark.live

TOKEN = "mailman-bulk-token"
LIST = "all-staff@nhs.example"


def _post(core, tmp: Path, n: int, mid: str, refs: str | None) -> None:
    text = (f"From: p{n}@nhs.example\nTo: {LIST}\nSubject: {'RE: ' if refs else ''}test\nMessage-ID: {mid}\n"
            + (f"In-Reply-To: {refs.split()[-1]}\nReferences: {refs}\n" if refs else "") + "\nplease remove me\n")
    path = tmp / f"post{n}.eml"
    path.write_text(text)
    subprocess.run([f"{core.venv}/bin/mailman", "-C", str(core.cfg), "--run-as-root", "inject", "-f", str(path),
                    LIST], check=True, capture_output=True, timeout=120)


async def test_mailman_held_posts_of_one_thread_are_discarded_in_bulk(tmp_path, monkeypatch):
    from stream_jobs.postfix.held import HeldMail, Postfix, serve_admin
    from stream_jobs.postfix.milter import MilterDecider
    from tests.stream_jobs.receivers import MailmanCore

    root = Path(__file__).resolve().parents[2]
    core = MailmanCore(root, tmp_path)
    core.install()
    core.start()
    admin = None
    try:
        client = core.client()
        client.create_domain("nhs.example")
        mlist = client.get_domain("nhs.example").create_list("all-staff")
        settings = mlist.settings
        settings["emergency"] = True  # what Stormguard's freeze sets: every post is held
        settings.save()
        _post(core, tmp_path, 0, "<root@nhs.example>", None)
        _post(core, tmp_path, 1, "<r1@nhs.example>", "<root@nhs.example>")
        _post(core, tmp_path, 2, "<r2@nhs.example>", "<elsewhere@nhs.example> <r1@nhs.example>")  # a reply to a reply
        _post(core, tmp_path, 3, "<rota@nhs.example>", None)
        for _ in range(8):  # the in runner, one message a pass: Mailman's own moderation holds them
            if len(client.get_list(LIST).held) == 4:
                break
            subprocess.run([f"{core.venv}/bin/runner", "-C", str(core.cfg), "-r", "in", "-o"], check=True,
                           capture_output=True, timeout=120)
        assert sorted(h.message_id for h in client.get_list(LIST).held) == \
            ["<r1@nhs.example>", "<r2@nhs.example>", "<root@nhs.example>", "<rota@nhs.example>"]

        book = HoldBook()  # the storm's thread, as the milter knows it from stormguard.thread-watch
        book.hold_thread(LIST, ThreadHold(root="<root@nhs.example>", ids=["<root@nhs.example>", "<r1@nhs.example>"]))
        held = HeldMail(str(tmp_path / "milter"), Postfix(), book)
        port = free_port()
        monkeypatch.setenv("STORMGUARD_ADMIN_TOKEN", TOKEN)
        monkeypatch.setenv("STORMGUARD_MAILMAN_URL", core.url)
        monkeypatch.setenv("STORMGUARD_MAILMAN_USER", core.user)
        monkeypatch.setenv("STORMGUARD_MAILMAN_PASSWORD", core.password)
        admin = await serve_admin(f"127.0.0.1:{port}", held, MilterDecider(book, {}), None)
        url = f"http://127.0.0.1:{port}/api/mailman"

        def call(verb: str, body: dict, token: str | None = TOKEN):
            return http_json(f"{url}/{verb}", "POST", body, token=token, timeout=60)

        loop = asyncio.get_running_loop()
        assert (await loop.run_in_executor(None, call, "discard", {"list": LIST}, None))[0] == 401
        code, result = await loop.run_in_executor(None, call, "discard", {"list": LIST, "thread": "<root@nhs.example>",
                                                                          "actor": "moderator"})
        assert code == 200, result
        assert result["discarded"] == 3 and result["not_in_thread"] == 1
        assert sorted(result["message_ids"]) == ["<r1@nhs.example>", "<r2@nhs.example>", "<root@nhs.example>"]
        assert [h.message_id for h in client.get_list(LIST).held] == ["<rota@nhs.example>"]

        code, result = await loop.run_in_executor(None, call, "release", {"list": LIST})  # the rest: accepted
        assert code == 200 and result["released"] == 1, result
        assert client.get_list(LIST).held == []
        code, result = await loop.run_in_executor(None, call, "release", {"list": "nobody@nhs.example"})
        assert code == 502 and "Mailman" in result["error"]  # not a Mailman list: said, not hidden
    finally:
        if admin is not None:
            await admin.cleanup()
        core.stop()
