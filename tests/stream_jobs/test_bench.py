"""``make bench`` in --quick mode: every figure is there, positive and consistent.

Speed is never asserted here (the machine is shared); only that the bench
measured what it says it measured.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest

from stream_jobs.bench.phases import STAGES
from tests.conftest import ROOT

pytestmark = pytest.mark.live

LIVE = ("faust_noop_stock", "faust_noop", "worker", "worker_sender_keyed", "two_workers")
THROUGHPUT = ("bare_aiokafka", *LIVE, "offline_score", "offline_score_cli")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench-results.json"
    done = subprocess.run([sys.executable, "-m", "stream_jobs.bench", "--quick", "--no-progress", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "worker_vs_noop" in done.stdout and str(out) in done.stdout  # the readable table was printed
    # list-keyed and sender-keyed side by side in the table, and their ratio
    assert "Stormguard worker (1), keyed by sender" in done.stdout and "sender_keyed_vs_list_keyed" in done.stdout
    return json.loads(out.read_text())


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.timeout(1200)
def test_every_throughput_figure_is_there_and_counts_every_event(results):
    from stream_jobs.bench.report import lookup

    n = results["events"]["count"]
    assert n >= 10_000 and results["events"]["list_posts"] > 0 and results["events"]["list_replies"] > 0
    assert results["events"]["partitions"] >= 2
    for name in THROUGHPUT:
        row = results["throughput"][name]
        assert row["events"] == n, name
        assert _positive(row["seconds"]) and _positive(row["events_per_s"]), (name, row)
    # Live consumers: rate is records timed over seconds timed.
    for name in LIVE:
        row = results["throughput"][name]
        assert 0 < row["timed_events"] <= n
        assert row["events_per_s"] == pytest.approx(row["timed_events"] / row["seconds"], rel=1e-9)
        assert sum(row["per_process"]) >= n  # every record was consumed (duplicates show as more)
    if sys.platform.startswith("linux"):  # CPU seconds of the consumer processes, from /proc
        for name in (*LIVE, "offline_score", "offline_score_cli"):
            row = results["throughput"][name]
            assert _positive(row["cpu_s"]) and row["events_per_cpu_s"] == pytest.approx(
                (row.get("timed_events") or row["events"]) / row["cpu_s"], rel=1e-9), name
    assert results["throughput"]["bare_aiokafka"]["events_per_s"] == pytest.approx(
        n / results["throughput"]["bare_aiokafka"]["seconds"], rel=1e-9)
    bare = results["throughput"]["bare_aiokafka"]  # the median of its passes: one short pass swung the ratio
    assert bare["passes"] == len(bare["passes_events_per_s"]) == 3
    assert bare["events_per_s"] == sorted(bare["passes_events_per_s"])[1]
    assert len(results["throughput"]["two_workers"]["per_process"]) == 2
    assert _positive(results["throughput"]["worker"]["metrics_scrape_ms"])
    assert results["throughput"]["offline_score"]["invalid"] == 0
    offline = results["throughput"]["offline_score"]
    assert len(offline["runs_events_per_cpu_s"]) == 3
    assert offline["events_per_cpu_s"] == max(offline["runs_events_per_cpu_s"])
    # The framework's ceiling was measured twice: on stock Faust and on the worker's own consumer.
    assert results["throughput"]["faust_noop_stock"]["consumer"] != results["throughput"]["faust_noop"]["consumer"]
    # The CLI and the in-process detector took the same decisions on the same records.
    assert results["throughput"]["offline_score_cli"]["actions"] == results["throughput"]["offline_score"]["actions"]
    assert lookup(results, "throughput.worker.events_per_s") == results["throughput"]["worker"]["events_per_s"]


@pytest.mark.timeout(1200)
def test_sender_keyed_worker_routes_every_list_post_and_counts_events(results):
    """The same events keyed by sender: every list post went through the by-list topic (one share each,
    a record of its own), and the phase's events/s counts events of mail.events, as the list-keyed one."""
    n = results["events"]["count"]
    listed, sender = results["throughput"]["worker"], results["throughput"]["worker_sender_keyed"]
    # Keyed by list (replay): every list post was scored where it landed, no by-list record was read.
    assert listed["per_process"] == [n]
    assert sender["keyed_by"].startswith("sender") and sender["partitions"] == results["events"]["partitions"]
    assert sender["fill"]["events"] == n and sender["workers"] == 1
    # realistic_events' list posts name one list each: one share per list post.
    assert sender["by_list_shares"] == results["events"]["list_posts"] > 0
    assert sender["records"] == n + sender["by_list_shares"] and sum(sender["per_process"]) >= sender["records"]
    assert 0 < sender["timed_records"] <= sender["records"]
    assert sender["records_per_s"] == pytest.approx(sender["timed_records"] / sender["seconds"], rel=1e-9)
    assert sender["events_per_s"] == pytest.approx(sender["records_per_s"] * n / sender["records"], rel=1e-9)
    assert sender["events_per_s"] < sender["records_per_s"]
    assert _positive(sender["bare_aiokafka_same_broker"]["events_per_s"])
    ratio = results["ratios"]["sender_keyed_vs_list_keyed"]["value"]
    assert ratio == pytest.approx(sender["events_per_s"] / listed["events_per_s"], rel=1e-9)


def test_the_traffic_is_the_same_in_every_process_for_one_seed():
    """The bench's events, made in two processes with different hash seeds, are byte for byte the same: A/B runs
    and the live-vs-offline comparison in separate processes score the same mail (a set's order used to differ)."""
    code = ("import hashlib, sys; from stream_jobs.bench.traffic import encode_all, realistic_events; "
            "sys.stdout.write(hashlib.sha256(b''.join(encode_all(realistic_events(3000, seed=7, "
            "end_time=1479112200.0)))).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONHASHSEED": seed}, check=True,
                              capture_output=True, text=True).stdout for seed in ("1", "2", "3")}
    assert len(digests) == 1 and len(digests.pop()) == 64


def test_sender_keys_and_the_shares_they_route():
    """``sender_key`` is the sender's bytes; ``by_list_shares`` routes as the worker does: a one-list post
    keyed by its list stays, any other list post sends one share per list, direct mail none."""
    from stream_jobs.bench.traffic import by_list_shares, encode_all, realistic_events, sender_key
    from stream_jobs.kafka.replay import routing_key

    one = b'{"message_id":"a","timestamp":1,"sender":"s@x","recipients":["l@x"],"lists":{"l@x":5}}'
    two = b'{"message_id":"b","timestamp":1,"sender":"s@x","recipients":["l@x","m@x"],"lists":{"l@x":5,"m@x":9}}'
    direct = b'{"message_id":"c","timestamp":1,"sender":"t@x","recipients":["u@x"]}'
    assert [sender_key(r) for r in (one, two, direct, b"not json")] == [b"s@x", b"s@x", b"t@x", None]
    assert by_list_shares([one, two, direct], routing_key, 4) == 2
    assert by_list_shares([one, two, direct], sender_key, 4) == 3
    assert by_list_shares([one, two, direct], sender_key, 1) == 0  # one partition: nothing is routed
    records = encode_all(realistic_events(2_000, seed=3))
    assert by_list_shares(records, routing_key, 4) == 0
    assert by_list_shares(records, sender_key, 4) == sum(1 for r in records if b'"lists"' in r) > 0


@pytest.mark.timeout(1200)
def test_ratios_are_the_quotients_of_the_figures(results):
    from stream_jobs.bench.report import RATIOS, lookup

    wanted = set(RATIOS) if sys.platform.startswith("linux") else {n for n in RATIOS if "per_cpu" not in n}
    if "exactly_once" not in results:  # that phase runs only with --exactly-once (make bench, on Apache Kafka)
        wanted = {n for n in wanted if not n.startswith("exactly_once")}
    assert wanted <= set(results["ratios"]) <= set(RATIOS)
    for name, (num, den) in RATIOS.items():
        if name not in results["ratios"]:
            continue
        ratio = results["ratios"][name]
        assert (ratio["of"], ratio["over"]) == (num, den)
        assert _positive(ratio["value"])
        assert ratio["value"] == pytest.approx(lookup(results, num) / lookup(results, den), rel=1e-9), name


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("key", ["latency", "latency_light", "latency_warm"])
def test_latency_figures(results, key):
    lat = results[key]
    assert lat["storms"] >= 3 and 1 <= lat["frozen"] <= lat["storms"]
    assert len(lat["samples_ms"]) == lat["frozen"]
    assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"] + 1e-6
    assert max(lat["samples_ms"]) == pytest.approx(lat["max_ms"], abs=0.01)
    assert _positive(lat["produced_eps"]) and lat["produced"] > 0
    assert 0 < lat["consumed"] <= lat["produced"]
    assert lat["background_target_eps"] > 0
    # the per-stage breakdown (the worker's STORMGUARD_LATENCY_TRACE joined with the bench's clocks): each
    # traced freeze's stages add up to its produce->freeze time, and every stage has its percentiles
    assert 1 <= lat["stages_traced"] == len(lat["stage_samples"]) <= lat["frozen"]
    assert set(lat["stages"]) == set(STAGES)
    for row in lat["stage_samples"]:
        assert sum(row[name] for name in STAGES) == pytest.approx(row["total"], abs=0.05)
        assert any(row["total"] == pytest.approx(v, abs=0.01) for v in lat["samples_ms"])
        for name in ("order_hold", "to_scorer", "scoring", "publish"):  # one process's clock: never negative
            assert row[name] >= 0, (name, row)
    for st in lat["stages"].values():
        assert st["p50_ms"] <= st["p99_ms"] <= st["max_ms"] + 1e-6


@pytest.mark.timeout(1200)
def test_startup_and_memory_figures(results):
    st = results["startup"]
    assert len(st["samples_s"]) >= 2 and all(_positive(x) for x in st["samples_s"])
    assert st["min_s"] <= st["median_s"] <= st["max_s"]

    mem = results["memory"]
    for key in ("bytes_per_sender", "bytes_per_list", "bytes_per_busy_list"):
        assert _positive(mem[key]), key
    assert mem["senders"] > 0 and mem["lists"] > 0 and mem["busy_lists"] > 0
    assert mem["bytes_per_busy_list"] > mem["bytes_per_list"]  # full buffers cost more than one post

    milter = results["milter"]  # the milter's decision per message (issue 17)
    assert milter["events"] == results["events"]["count"] and milter["held"] > 0
    assert 0 < milter["p50_ms"] <= milter["p99_ms"] <= milter["max_ms"]
    assert "milter_decide_vs_offline_score_per_cpu" in results["ratios"]

    m = results["machine"]
    assert m["cpus"] >= 1 and m["python"] and m["cpu_model"] is not None
    assert _positive(results["duration_s"])


@pytest.mark.timeout(120)
def test_background_generator_sends_valid_events_where_replay_would(broker):
    """``stream_jobs.bench.load`` (the latency phase's background): valid events, at about the
    asked count, each on the partition kafka-python (``stormguard replay``) would choose."""
    from kafka.partitioner.default import murmur2

    from detectors.events import parse_event
    from stream_jobs.kafka.replay import routing_key
    from stream_jobs.kafka.topics import ensure_topics
    from tests.conftest import read_topic

    ensure_topics(broker.url, 4)
    load = subprocess.Popen([sys.executable, "-m", "stream_jobs.bench.load", broker.url, "400", "1.0", "7"],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert load.stdout.readline().strip() == "ready"
    out, _ = load.communicate("go\n", timeout=60)
    report = json.loads(out.strip().splitlines()[-1])
    assert load.returncode == 0 and 0 < report["produced"] <= 400 + 1 and report["seconds"] >= 1.0
    records = read_topic(broker.bootstrap, "mail.events", timeout=15,
                         until=lambda rs: len(rs) >= report["produced"])
    assert len(records) == report["produced"]
    for r in records:
        parse_event(r.value)  # raises on anything outside the event contract
        assert r.key == routing_key(r.value)
        assert r.partition == (murmur2(r.key) & 0x7FFFFFFF) % 4  # Kafka's default partitioner


def test_background_generator_says_how_to_call_it():
    done = subprocess.run([sys.executable, "-m", "stream_jobs.bench.load", "kafka://127.0.0.1:9"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: python -m stream_jobs.bench.load" in done.stderr


def test_the_ab_table_shows_every_round_and_pairs_each_variant_but_bare_and_the_reference():
    from stream_jobs.bench.ab import table

    def rnd(worker: float, before: float, cpu: object = 9000.0) -> dict:
        return {"bare": {"events_per_s": 100_000.0, "events_per_cpu_s": 50_000.0},
                "worker": {"events_per_s": worker, "events_per_cpu_s": cpu, "vs_bare": worker / 100_000,
                           "vs_reference": worker / before},
                "worker@before": {"events_per_s": before, "events_per_cpu_s": 8000.0, "vs_bare": before / 100_000},
                "load_before": [1.0], "load_after": [2.5]}

    results = {"variants": ["bare", "worker", "worker@before"], "reference": "worker@before",
               "rounds": [rnd(20_000.0, 16_000.0), rnd(25_000.0, 20_000.0, cpu=None)],
               "median": {"bare": {}, "worker": {"vs_bare": 0.225, "vs_bare_per_cpu": 0.2, "vs_reference": 1.25},
                          "worker@before": {"vs_bare": 0.18}},
               "events": 200_000, "partitions": 8, "keyed_by": "sender", "by_list_shares": 30_000, "engine": "tansu"}
    text = table(results)
    first, paired = text.split("paired in each round")
    assert "| worker | 20,000 · 25,000 | 9,000 · – | 0.200 · 0.250 | 0.225 | 0.200 |" in first
    assert "| worker@before | 16,000 · 20,000 | 8,000 · 8,000 | 0.160 · 0.200 | 0.180 | – |" in first
    assert "| worker | 1.250 · 1.250 | – · – | 1.250 | – |" in paired
    assert "| bare |" not in paired and "| worker@before |" not in paired
    assert "load average (1 min) per round: 1.0→2.5, 1.0→2.5" in paired


@pytest.mark.timeout(900)
def test_the_ab_harness_times_each_variant_in_every_round_against_that_rounds_bare_run(tmp_path):
    """``make bench-ab`` on a small topic: two rounds of bare aiokafka, the worker, and the worker of a git
    commit (this one, from a snapshot), each round's ratio against that round's bare run."""
    out = tmp_path / "ab.json"
    done = subprocess.run([sys.executable, "-m", "stream_jobs.bench.ab", "--events", "20000", "--rounds", "2",
                           "--variants", "bare,worker,worker@head", "--code", "head=HEAD", "--no-progress",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["keyed_by"] == "sender" and res["partitions"] == 8 and res["by_list_shares"] > 0
    assert len(res["code"]["head"]) == 40 and len(res["rounds"]) == 2
    for rnd in res["rounds"]:
        for v in ("bare", "worker", "worker@head"):
            assert _positive(rnd[v]["events_per_s"]) and _positive(rnd[v]["events_per_cpu_s"]), (v, rnd)
        for v in ("worker", "worker@head"):
            assert rnd[v]["vs_bare"] == pytest.approx(rnd[v]["events_per_s"] / rnd["bare"]["events_per_s"])
            # the worker counts a by-list share as a record; events/s counts events of mail.events
            assert rnd[v]["records_per_s"] > rnd[v]["events_per_s"]
    # the code before (the first worker@LABEL) is the reference: the other worker is divided by it round by round
    assert res["reference"] == "worker@head"
    paired = [rnd["worker"]["vs_reference_per_cpu"] for rnd in res["rounds"]]
    for rnd in res["rounds"]:
        assert rnd["worker"]["vs_reference"] == pytest.approx(rnd["worker"]["events_per_s"]
                                                              / rnd["worker@head"]["events_per_s"])
        assert "vs_reference" not in rnd["worker@head"]
    assert res["median"]["worker"]["vs_reference_per_cpu"] == pytest.approx(statistics.median(paired))
    assert "worker@head" in done.stdout and "load average" in done.stdout and "paired in each round" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "stream_jobs.bench.ab", "--variants", "bare,worker@nowhere"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "worker@nowhere" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "stream_jobs.bench.ab", "--variants", "bare,worker",
                          "--reference", "worker@before"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--reference 'worker@before'" in bad.stderr
