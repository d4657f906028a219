"""The detection principles on small hand-made streams, unlike the simulator's (fast, and independent of it)."""

from __future__ import annotations

import random

from detectors.engine import StormDetector
from detectors.events import MailEvent

MON = 1_478_476_800.0  # Monday 7 November 2016 00:00 UTC
DAY, HOUR, MIN = 86400.0, 3600.0, 60.0


class Stream:
    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.events: list[MailEvent] = []
        self.n = 0

    def add(self, t, sender, lst=None, members=0, reply_to=None, subject="s", rcpts=None) -> str:
        self.n += 1
        mid = f"<{self.n}@t>"
        self.events.append(MailEvent(
            message_id=mid, timestamp=t, sender=sender, recipients=rcpts or [lst],
            lists={lst: members} if lst else {}, in_reply_to=reply_to,
            subject=None if lst is None else (subject if reply_to is None else "RE: " + subject)))
        return mid

    def chatter(self, start, days, people=300, per_hour=30):
        for d in range(days):
            for h in range(8, 18):
                for _ in range(per_hour):
                    t = start + d * DAY + h * HOUR + self.rng.random() * HOUR
                    self.add(t, f"u{self.rng.randrange(people)}@o", rcpts=[f"u{self.rng.randrange(people)}@o"])

    def run(self, det=None):
        det = det or StormDetector()
        out = []
        for ev in sorted(self.events, key=lambda e: e.event_time):
            out += [(a, ev) for a in det.process(ev)]
        return det, out


def freezes(out, lst=None):
    return [(a, ev) for a, ev in out if a.kind == "freeze" and (lst is None or a.list == lst)]


def test_bulletins_with_stray_replies_and_lively_discussions_are_never_frozen():
    s = Stream(1)
    s.chatter(MON, 5)
    for d in range(5):
        root = s.add(MON + d * DAY + 9 * HOUR, "comms@o", "all@o", 50_000, subject=f"news {d}")
        for k in range(s.rng.choice([0, 1, 2])):  # one or two stray replies, now and then
            s.add(MON + d * DAY + 9 * HOUR + s.rng.uniform(2, 180) * MIN, f"u{s.rng.randrange(300)}@o", "all@o",
                  50_000, reply_to=root, subject=f"news {d}")
    for lst, members in (("talk@o", 150), ("forum@o", 450)):
        for d in range(5):
            for h in range(8, 18):  # a dozen reply-alls every working hour, from anyone
                root = s.add(MON + d * DAY + h * HOUR, f"u{s.rng.randrange(300)}@o", lst, members,
                             subject=f"{lst} {d} {h}")
                for k in range(12):
                    s.add(MON + d * DAY + h * HOUR + (k + 1) * 4 * MIN, f"u{s.rng.randrange(300)}@o", lst, members,
                          reply_to=root, subject=f"{lst} {d} {h}")
    _, out = s.run()
    assert freezes(out) == []


def test_a_bulletin_that_turns_into_a_storm_is_frozen_at_the_third_reply_all():
    s = Stream(2)
    s.chatter(MON, 4)
    for d in range(4):
        s.add(MON + d * DAY + 9 * HOUR, "comms@o", "all@o", 50_000, subject=f"news {d}")
    root = s.add(MON + 4 * DAY + 9 * HOUR, "comms@o", "all@o", 50_000, subject="news 4")
    replies = [s.add(MON + 4 * DAY + 9 * HOUR + (k + 1) * 30, f"r{k}@o", "all@o", 50_000, reply_to=root,
                     subject="news 4") for k in range(20)]
    _, out = s.run()
    (action, ev), = freezes(out)
    assert ev.message_id == replies[2]


def test_a_slow_burn_is_frozen_at_the_third_reply_all_however_slowly_it_starts():
    s = Stream(3)
    s.chatter(MON, 4)
    for d in range(4):
        s.add(MON + d * DAY + 10 * HOUR, "hr@o", "managers@o", 4000, subject=f"memo {d}")
    root = s.add(MON + 3 * DAY + 11 * HOUR, "hr@o", "managers@o", 4000, subject="parking")
    gaps = [70, 65, 50, 20, 10, 5, 3, 2, 1, 1, 1]  # minutes between reply-alls: slow, then faster
    t, ids = MON + 3 * DAY + 11 * HOUR, []
    for k, g in enumerate(gaps):
        t += g * MIN
        ids.append(s.add(t, f"m{k}@o", "managers@o", 4000, reply_to=root, subject="parking"))
    _, out = s.run()
    (action, ev), = freezes(out, "managers@o")
    assert ev.message_id in ids[:3]


def test_an_all_staff_storm_in_a_small_organisation_is_frozen_within_three():
    s = Stream(4)
    s.chatter(MON, 3, people=700, per_hour=8)
    s.add(MON + 9 * HOUR, "office@o", "staff@o", 700, subject="welcome")
    root = s.add(MON + 2 * DAY + 11 * HOUR, "office@o", "staff@o", 700, subject="fire drill")
    ids = [s.add(MON + 2 * DAY + 11 * HOUR + (k + 1) * 45, f"u{k}@o", "staff@o", 700, reply_to=root,
                 subject="fire drill") for k in range(40)]
    _, out = s.run()
    (action, ev), = freezes(out, "staff@o")
    assert ev.message_id in ids[:3]


def test_a_sender_who_never_posts_to_lists_posting_to_a_bulletin_list_is_frozen_at_the_first_reply():
    s = Stream(5)
    s.chatter(MON, 3)
    for d in range(3):
        s.add(MON + d * DAY + 9 * HOUR, "comms@o", "all@o", 50_000, subject=f"news {d}")
    root = s.add(MON + 2 * DAY + 14 * HOUR, "u17@o", "all@o", 50_000, subject="test")  # u17 only sends 1:1 mail
    ids = [s.add(MON + 2 * DAY + 14 * HOUR + (k + 1) * 20, f"r{k}@o", "all@o", 50_000, reply_to=root,
                 subject="test") for k in range(10)]
    _, out = s.run()
    (action, ev), = freezes(out, "all@o")
    assert ev.message_id == ids[0] and action.detector == "reply_to_anomalous_post"


def test_a_never_seen_list_of_everyone_is_frozen_at_the_first_reply():
    s = Stream(6)
    s.chatter(MON, 1)
    s.add(MON + 9 * HOUR, "comms@o", "all-staff@o", 5_000, subject="news")
    root = s.add(MON + 15 * HOUR, "supplier@x", "everyone@o", 840_000, subject="test")
    ids = [s.add(MON + 15 * HOUR + (k + 1) * 20, f"r{k}@o", "everyone@o", 840_000, reply_to=root, subject="test")
           for k in range(10)]
    _, out = s.run()
    (action, ev), = freezes(out, "everyone@o")
    assert ev.message_id == ids[0]


def test_history_is_learned_from_but_never_acted_on():
    """A storm that ended before ``learn_only_until`` freezes nothing; what it taught stays, and the
    detector acts on what comes after."""
    from detectors.engine import StormDetector
    from detectors.events import MailEvent
    from detectors.policy import PolicyConfig

    def storm(t0, lst, members):
        root = MailEvent(message_id=f"{lst}-root", timestamp=t0, sender=f"boss-{lst}", recipients=[lst],
                         lists={lst: members}, subject="test")
        replies = [MailEvent(message_id=f"{lst}-{i}", timestamp=t0 + 10 * i, sender=f"r{i}-{lst}", recipients=[lst],
                             lists={lst: members}, in_reply_to=root.message_id, subject="RE: test")
                   for i in range(1, 5)]
        return [root] + replies

    old = storm(100.0, "all@nhs.net", 840_000)
    live = StormDetector(PolicyConfig(warmup_events=0))
    assert [a.kind for e in old for a in live.process(e)].count("freeze") == 1

    seeded = StormDetector(PolicyConfig(warmup_events=0, learn_only_until=1000.0))
    assert [a for e in old for a in seeded.process(e)] == []
    assert not seeded.list_status("all@nhs.net").frozen and seeded.history_learned == 5
    assert seeded.lists["all@nhs.net"].posts == 5 and seeded.largest_list == 840_000  # learned

    new = storm(2000.0, "everyone@nhs.net", 900_000)
    kinds = [a.kind for e in new for a in seeded.process(e)]
    assert kinds[:2] == ["alert", "freeze"] and seeded.history_learned == 5
