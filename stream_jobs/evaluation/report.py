"""The evaluation report: Markdown tables and matplotlib plots (Agg, PNG).

``write_report(result, directory)`` takes the JSON of ``stormguard evaluate``
and writes ``report.md`` beside one ``<scenario>.png`` per storm: cumulative
deliveries of the storm over event time, unstopped, with Stormguard, with
Exchange's rule and with the static rule, each freeze marked.

>>> print(_num(507_360_000), _num(3_264), _num(None))
507.4M 3,264 -
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

GUARDS = ("stormguard", "exchange", "static")
LABELS = {"unstopped": "no protection", "stormguard": "Stormguard", "exchange": "Exchange default rule",
          "static": "static threshold (20/h)"}
COLOURS = {"unstopped": "#999999", "stormguard": "#1b7837", "exchange": "#d6604d", "static": "#4393c3"}


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
                    f" {'freeze' if name != 'exchange' else 'thread blocked'} ({_dur(g['freeze_after_s'])})",
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
    rows = ["| traffic | events | list posts | lists | Stormguard freezes | Stormguard alerts | Exchange blocks "
            "| static freezes |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b in result["benign"]:
        rows.append(f"| {b['name']} | {b['events']:,} | {b['list_posts']:,} | {b['lists']} | "
                    f"{b['freezes']['stormguard']} | {b['alerts']['stormguard']} | {b['freezes']['exchange']} | "
                    f"{b['freezes']['static']} |")
    return rows


def summary_table(result: dict) -> str:
    """A short plain-text summary for the terminal."""
    lines = [f"{'scenario':22} {'limit':>5} {'Stormguard':>22} {'Exchange':>22} {'prevented SG / EX':>20}"]
    for s in result["storms"]:
        sg, ex = s["guards"].get("stormguard", {}), s["guards"].get("exchange", {})
        lines.append(f"{s['scenario']:22} {s['criterion_max_replies'] or '-':>5} "
                     f"{sg.get('replies_delivered_before_freeze', '-'):>4} replies, {_dur(sg.get('freeze_after_s')):>8}"
                     f"   {ex.get('replies_delivered_before_freeze', '-'):>4} replies, {_dur(ex.get('freeze_after_s')):>8}"
                     f"   {sg.get('prevented_pct', 0):6.2f}% / {ex.get('prevented_pct', 0):6.2f}%"
                     + ("" if s["passed"] else "   (criterion missed)" if s["passed"] is False else ""))
    for b in result["benign"]:
        lines.append(f"{b['name']:22} benign: {b['freezes']['stormguard']} Stormguard freezes, "
                     f"{b['alerts']['stormguard']} alerts, {b['freezes']['exchange']} Exchange blocks, "
                     f"{b['freezes']['static']} static freezes ({b['events']:,} events)")
    return "\n".join(lines)


def write_report(result: dict, directory: Path) -> Path:
    """Write ``report.md`` and the plots into ``directory``; returns the report's path."""
    directory.mkdir(parents=True, exist_ok=True)
    md = ["# Stormguard evaluation", "",
          f"Mode: {result['mode']}; seed {result['seed']}; {result['seconds']} s to run. Generated by "
          "`stormguard evaluate`. Times are event time; a freeze holds every later post to the list "
          "(the triggering reply-all itself was already delivered). Exchange's rule blocks the storm's thread "
          "once 10 reply-alls to 5,000+ recipients arrive within 60 minutes; the static rule freezes a list "
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
