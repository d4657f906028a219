"""The evaluation report: Markdown tables and matplotlib plots (Agg, PNG).

``write_report(result, directory)`` takes the JSON of ``stormguard evaluate``
and writes ``report.md`` beside one ``<scenario>.png`` per storm: cumulative
deliveries of the storm over event time, unstopped, with Stormguard, with
Exchange's rule (its default and its tightest setting) and with the static
rule, each freeze marked. ``seeds_markdown`` turns ``stormguard evaluate
--seeds``' JSON into seed-by-seed tables.

>>> print(_num(507_360_000), _num(3_264), _num(None))
507.4M 3,264 -
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

GUARDS = ("stormguard", "thread-hold", "exchange", "exchange-tight", "static")
LABELS = {"unstopped": "no protection", "stormguard": "Stormguard (list freeze)",
          "thread-hold": "Stormguard + milter (thread hold)",
          "exchange": "Exchange default rule (10 reply-alls, 2,500+ recipients)",
          "exchange-tight": "Exchange tightest setting (5 reply-alls, 1,000+ recipients)",
          "static": "static threshold (20/h)"}
COLOURS = {"unstopped": "#999999", "stormguard": "#1b7837", "thread-hold": "#762a83", "exchange": "#d6604d", "exchange-tight": "#f4a582",
           "static": "#4393c3"}


def _num(n: Optional[float]) -> str:
    if n is None:
        return "-"
    if abs(n) >= 1_000_000:
        return f"{n / 1_000_000:.1f}M"
    return f"{int(n):,}"


def _dur(s: Optional[float]) -> str:
    if s is None:
        return "never"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def plot_storm(storm: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name in ("unstopped",) + GUARDS:
        curve = storm["curves"].get(name)
        if not curve:
            continue
        xs = [c[0] for c in curve]
        ys = [c[1] for c in curve]
        end = storm["curves"]["unstopped"][-1][0]
        xs.append(max(end, xs[-1]))
        ys.append(ys[-1])
        ax.step(xs, ys, where="post", color=COLOURS[name], lw=2 if name == "stormguard" else 1.4,
                label=f"{LABELS[name]}: {_num(ys[-1])}")
        g = storm["guards"].get(name, {})
        if name != "unstopped" and g.get("freeze_after_s") is not None:
            x = g["freeze_after_s"] / 60.0
            ax.axvline(x, color=COLOURS[name], ls="--", lw=0.9)
            ax.text(x, 0.04 + 0.07 * GUARDS.index(name),
                    f" {'thread blocked' if name.startswith('exchange') else 'freeze'} ({_dur(g['freeze_after_s'])})",
                    transform=ax.get_xaxis_transform(), color=COLOURS[name], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(1, storm["members"]) * 0.5)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)
    ax.set_xlabel("minutes since the first post (event time; linear to 1 min, then log)")
    ax.set_ylabel("cumulative deliveries of the storm")
    ax.set_title(f"{storm['scenario']} (seed {storm['seed']}): {storm['members']:,} members")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def storm_rows(result: dict) -> list[str]:
    rows = ["| scenario | members | rule | first post → freeze | reply-alls delivered before freeze (limit) "
            "| deliveries made | prevented | false freezes | alerts |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for s in result["storms"]:
        rows.append(f"| **{s['scenario']}** | {s['members']:,} | no protection | - | "
                    f"{s['guards']['unstopped']['replies_delivered']} | {_num(s['unstopped_deliveries'])} | - | - | - |")
        for name in GUARDS:
            g = s["guards"].get(name)
            if g is None:
                continue
            limit = f" (≤{s['criterion_max_replies']})" if name == "stormguard" else ""
            ok = "" if name != "stormguard" else (" ✅" if s["passed"] else " ❌")
            rows.append(f"| | | {LABELS[name]} | {_dur(g['freeze_after_s'])} | "
                        f"{g['replies_delivered_before_freeze']}{limit}{ok} | {_num(g['deliveries'])} | "
                        f"{_num(g['prevented'])} ({g['prevented_pct']:.2f}%) | {g['false_freezes']} | {g['alerts']} |")
    return rows


def benign_rows(result: dict) -> list[str]:
    rows = ["| traffic | events | list posts | lists | Stormguard freezes | Stormguard alerts | replies held by a "
            "thread hold | Exchange blocks (default / tightest) | static freezes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in result["benign"]:
        rows.append(f"| {b['name']} | {b['events']:,} | {b['list_posts']:,} | {b['lists']} | "
                    f"{b['freezes']['stormguard']} | {b['alerts']['stormguard']} | {b.get('thread_held', '-')} | "
                    f"{b['freezes']['exchange']} / "
                    f"{b['freezes'].get('exchange-tight', '-')} | {b['freezes']['static']} |")
    return rows


def summary_table(result: dict) -> str:
    """A short plain-text summary for the terminal."""
    lines = [f"{'scenario':22} {'limit':>5} {'Stormguard':>22} {'Exchange default':>22} {'Exchange tightest':>22} "
             f"{'prevented SG / EX / EX-tight':>28}"]
    for s in result["storms"]:
        sg, ex, et = (s["guards"].get(k, {}) for k in ("stormguard", "exchange", "exchange-tight"))
        lines.append(f"{s['scenario']:22} {s['criterion_max_replies'] or '-':>5} "
                     + "".join(f"{g.get('replies_delivered_before_freeze', '-'):>4} replies, "
                               f"{_dur(g.get('freeze_after_s')):>8}   " for g in (sg, ex, et))
                     + f"{sg.get('prevented_pct', 0):6.2f}% / {ex.get('prevented_pct', 0):6.2f}% / "
                     f"{et.get('prevented_pct', 0):6.2f}%"
                     + ("" if s["passed"] else "   (criterion missed)" if s["passed"] is False else ""))
    for s in result["storms"]:
        th = s["guards"].get("thread-hold")
        if th is not None:
            lines.append(f"{s['scenario']:22} thread hold (milter): {th['replies_delivered']} reply-alls delivered, "
                         f"{th['prevented_pct']:6.2f}% prevented")
    for b in result["benign"]:
        lines.append(f"{b['name']:22} benign: {b['freezes']['stormguard']} Stormguard freezes, "
                     f"{b['alerts']['stormguard']} alerts, {b['freezes']['exchange']} / "
                     f"{b['freezes'].get('exchange-tight', '-')} Exchange blocks (default / tightest), "
                     f"{b['freezes']['static']} static freezes ({b['events']:,} events)")
    return "\n".join(lines)


def _seed_cells(values: list) -> str:
    return " ".join("–" if v is None else str(v) for v in values)


def seeds_markdown(result: dict) -> str:
    """Seed-by-seed tables of ``stormguard evaluate --seeds``: reply-alls before each freeze, false freezes."""
    seeds, runs = result["seeds"], result["runs"]
    span = f"{seeds[0]}–{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ", ".join(map(str, seeds))
    names = list(dict.fromkeys(s["scenario"] for run in runs for s in run["storms"]))
    md = [f"Seeds {span} ({len(seeds)}), offline, {result['seconds']:.0f} s. Reply-alls delivered before the "
          "freeze (– : never frozen), seed by seed, and the limit: 1 where the first post is anomalous, 3 with "
          "history, 5 at a cold start.", "",
          "| scenario | start | limit | Stormguard, seed by seed | worst | met | Stormguard false freezes "
          "| thread hold: reply-alls delivered, worst | Exchange default: median (never) "
          "| Exchange tightest: median (never) |",
          "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]

    def median(xs: list) -> str:
        got = sorted(x for x in xs if x is not None)
        return "-" if not got else str(got[len(got) // 2])

    for name in names:
        storms = [next((s for s in run["storms"] if s["scenario"] == name), None) for run in runs]
        storms = [s for s in storms if s is not None]
        sg = [s["guards"]["stormguard"]["replies_delivered_before_freeze"]
              if s["guards"]["stormguard"]["freeze_after_s"] is not None else None for s in storms]
        peers = []
        for key in ("exchange", "exchange-tight"):
            vals = [s["guards"][key]["replies_delivered_before_freeze"] if key in s["guards"]
                    and s["guards"][key]["freeze_after_s"] is not None else None for s in storms]
            peers.append(f"{median(vals)} ({sum(v is None for v in vals)})")
        limit = storms[0]["criterion_max_replies"]
        met = sum(bool(s["passed"]) for s in storms)
        worst = "never" if None in sg else max(sg)
        false = sum(s["guards"]["stormguard"]["false_freezes"] for s in storms)
        held = [s["guards"]["thread-hold"]["replies_delivered"] for s in storms if "thread-hold" in s["guards"]]
        md.append(f"| {name} | {'cold' if storms[0].get('cold') else 'history'} | {limit} | {_seed_cells(sg)} | "
                  f"{worst} | {met}/{len(storms)} | {false} | {max(held) if held else '-'} | {peers[0]} | "
                  f"{peers[1]} |")
    md += ["", "Benign traffic, freezes seed by seed (every one a false freeze):", "",
           "| traffic | Stormguard, seed by seed | total | Stormguard alerts (total) | replies held by a thread hold "
           "(total) | Exchange default / tightest (total) | static (total) |", "|---|---|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(b["name"] for run in runs for b in run["benign"]):
        bs = [b for run in runs for b in run["benign"] if b["name"] == name]
        sg = [b["freezes"]["stormguard"] for b in bs]
        md.append(f"| {name} | {_seed_cells(sg)} | **{sum(sg)}** | {sum(b['alerts']['stormguard'] for b in bs)} | "
                  f"{sum(b.get('thread_held', 0) for b in bs)} | {sum(b['freezes']['exchange'] for b in bs)} / "
                  f"{sum(b['freezes'].get('exchange-tight', 0) for b in bs)} | "
                  f"{sum(b['freezes']['static'] for b in bs)} |")
    frozen = sorted({(b["name"], run["seed"], lst) for run in runs for b in run["benign"]
                     for lst in b["frozen_lists"]["stormguard"]})
    frozen += sorted({(s["scenario"], run["seed"], f"{s['guards']['stormguard']['false_freezes']} in the background")
                      for run in runs for s in run["storms"] if s["guards"]["stormguard"]["false_freezes"]})
    if frozen:
        md += ["", "Stormguard's false freezes:", ""] + [f"- {n} seed {seed}: {what}" for n, seed, what in frozen]
    return "\n".join(md) + "\n"


def write_report(result: dict, directory: Path) -> Path:
    """Write ``report.md`` and the plots into ``directory``; returns the report's path."""
    directory.mkdir(parents=True, exist_ok=True)
    md = ["# Stormguard evaluation", "",
          f"Mode: {result['mode']}; seed {result['seed']}; {result['seconds']} s to run. Generated by "
          "`stormguard evaluate`. Times are event time; a freeze holds every later post to the list "
          "(the triggering reply-all itself was already delivered). The thread hold is the same decisions with "
          "`stormguard milter` in the gateway: replies into a thread Stormguard holds (an anomalous first post's, "
          "a storm's) are held too, the triggering reply-all included. Exchange's rule blocks the storm's thread "
          "once 10 reply-alls to 2,500+ recipients arrive within 60 minutes (its documented default; its "
          "tightest setting: 5 reply-alls to 1,000+); the static rule freezes a list "
          "of 100+ members after more than 20 reply-alls within 60 minutes.", "",
          "## Storms", ""]
    md += storm_rows(result)
    md += ["", "Deliveries prevented are measured against the same storm, same seed, unstopped: the simulated "
           "storm only grows from delivered reply-alls, so once a list is frozen its storm dies down.", ""]
    for s in result["storms"]:
        png = plot_storm(s, directory / f"{s['scenario'].replace('+', '-')}.png")
        md += [f"### {s['scenario']}", "", s["description"] + ".", "",
               f"Unstopped: {s['unstopped_messages']:,} storm messages, {_num(s['unstopped_deliveries'])} "
               "deliveries.", "", f"![{s['scenario']}]({png.name})", ""]
    md += ["## Benign traffic: false freezes and alerts", ""] + benign_rows(result) + [""]
    frozen = [(b["name"], b["frozen_lists"]["stormguard"]) for b in result["benign"] if b["frozen_lists"]["stormguard"]]
    if frozen:
        md += ["Lists Stormguard froze on benign traffic:", ""]
        md += [f"- {name}: {', '.join(lists)}" for name, lists in frozen] + [""]
    path = directory / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
