"""Small hand-made event streams for the core tests (the simulator makes the big ones)."""

from __future__ import annotations

import json

T0 = 1_479_110_000.0  # Monday 14 November 2016, early morning (UTC)


def background(n: int = 150, people: int = 30, start: float = T0) -> list[dict]:
    """Ordinary person-to-person mail: enough to finish the warm-up."""
    return [{"message_id": f"bg{i}", "timestamp": start + i * 10, "sender": f"u{i % people}@nhs.net",
             "recipients": [f"u{(i + 1) % people}@nhs.net", f"u{(i + 7) % people}@nhs.net"][: 1 + i % 2]}
            for i in range(n)]


def nhsmail_storm(start: float, replies: int = 8, members: int = 840_000, lst: str = "all@nhs.net") -> list[dict]:
    """A test message from someone who never posts to lists, then reply-alls."""
    out = [{"message_id": "root", "timestamp": start, "sender": "consultant@supplier.example",
            "recipients": [lst], "lists": {lst: members}, "subject": "test"}]
    for j in range(replies):
        out.append({"message_id": f"reply{j}", "timestamp": start + 40 + j * 7, "sender": f"staff{j}@nhs.net",
                    "recipients": [lst], "lists": {lst: members}, "subject": "RE: test",
                    "in_reply_to": "root" if j % 2 == 0 else f"reply{j - 1}"})
    return out


BAD_RECORDS: list[bytes] = [
    b"not json at all",
    b'{"message_id": "m", "timestamp": 5}',
    b'{"message_id": "m", "timestamp": -5, "sender": "a", "recipients": ["b"]}',
    b'{"message_id": "m", "timestamp": 1e400, "sender": "a", "recipients": ["b"]}',
    b'{"message_id": "m", "timestamp": 1479110000, "sender": "a", "recipients": []}',
    b'{"message_id": "m", "timestamp": 1479110000, "sender": "a", "recipients": ["b"], "delivered_count": -1}',
    b'\xff\xfe\x00garbage',
]


def lines(events: list[dict]) -> list[bytes]:
    return [json.dumps(e).encode() for e in events]


def bulletin_storm(replies: int = 6, members: int = 50_000) -> list[dict]:
    """A daily bulletin from its usual owner for three days, then reply-alls to the last one.

    The first post of this storm is ordinary, so the velocity rule must catch it.
    """
    out = []
    for k in range(3):
        out.append({"message_id": f"bul{k}", "timestamp": T0 + 2500 + k * 86_400, "sender": "comms@nhs.net",
                    "recipients": ["bulletin@nhs.net"], "lists": {"bulletin@nhs.net": members},
                    "subject": f"Daily bulletin {k}"})
    start = T0 + 2500 + 2 * 86_400 + 900
    out += [{"message_id": f"bre{j}", "timestamp": start + j * 30, "sender": f"x{j}@nhs.net",
             "recipients": ["bulletin@nhs.net"], "lists": {"bulletin@nhs.net": members},
             "subject": "RE: Daily bulletin 2", "in_reply_to": "bul2"} for j in range(replies)]
    return out
