"""The house plan (issue 15): rooms import only rooms below them, no import circles, no app at import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: stream_jobs' rooms, lowest first: a module may import its own room and the rooms below it.
#: The ground floor is the package's top-level settings and metrics; the command line is the roof.
ROOMS = [
    ("ground", ["stream_jobs", "stream_jobs.settings", "stream_jobs.metrics"]),
    ("kafka", ["stream_jobs.kafka"]),
    ("worker", ["stream_jobs.worker"]),
    ("actions", ["stream_jobs.actions"]),
    ("postfix", ["stream_jobs.postfix"]),
    ("evaluation", ["stream_jobs.evaluation"]),
    ("observability", ["stream_jobs.observability"]),
    ("bench", ["stream_jobs.bench"]),
    ("cli", ["stream_jobs.core_commands", "stream_jobs.learn", "stream_jobs.cli"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def imported(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file (in functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def graph() -> dict[str, set[str]]:
    """stream_jobs module -> the stream_jobs modules it imports."""
    mods = modules("stream_jobs")
    return {name: {n for n in imported(path) if n in mods and n != name} for name, path in mods.items()}


def room_of(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(ROOMS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    return rank


def test_every_module_has_a_room():
    homeless = [m for m in graph() if room_of(m) < 0]
    assert not homeless, f"modules outside every room (add them to ROOMS): {homeless}"
    # the ground floor is only the top-level modules named there, not whatever sits beside them
    top = [m for m in graph() if m.count(".") == 1 and not (ROOT / m.replace(".", "/")).is_dir()]
    assert sorted(top) == sorted(["stream_jobs.settings", "stream_jobs.metrics", "stream_jobs.cli",
                                  "stream_jobs.core_commands", "stream_jobs.learn"]), top


def test_rooms_import_only_rooms_below_them():
    upward = [f"{m} ({ROOMS[room_of(m)][0]}) imports {n} ({ROOMS[room_of(n)][0]})"
              for m, deps in graph().items() for n in sorted(deps) if room_of(n) > room_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_detectors_import_nothing_of_the_shell():
    forbidden = ("stream_jobs", "faust", "kafka", "aiokafka", "mode")
    bad = [f"{m} imports {n}" for m, path in modules("detectors").items() for n in sorted(imported(path))
           if n.split(".")[0] in forbidden]
    assert not bad, bad


def test_importing_every_module_builds_no_faust_app():
    """In a fresh interpreter: import every module of stream_jobs and detectors; no faust.App is made."""
    script = """
import importlib, pkgutil, sys
import faust
made = []
real = faust.App.__init__
def record(self, *a, **kw):
    made.append(a[:1])
    real(self, *a, **kw)
faust.App.__init__ = record
import detectors, stream_jobs
names = [m.name for pkg in (detectors, stream_jobs)
         for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(len(names), made)
sys.exit(1 if made else 0)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert int(done.stdout.split()[0]) > 30  # every module was imported


def test_create_app_builds_an_independent_app_each_time():
    from stream_jobs.settings import WorkerSettings
    from stream_jobs.worker.app import create_app

    settings = WorkerSettings.from_env({})
    a, b = create_app(settings), create_app(settings)
    assert a is not b and a.stormguard is not b.stormguard
    # the scorer is a batch agent on the worker's consumer (issue 19), a Faust agent on stock Faust
    assert sorted([*a.agents, *{h.name for h in a.batch_handlers.values()}]) == \
        ["stream_jobs.worker.operate", "stream_jobs.worker.score"]
    assert a.stormguard.detector is not b.stormguard.detector


def test_paths_and_modules_named_in_the_docs_exist():
    """Every stream_jobs path and every ``python -m stream_jobs...`` in README.md and docs/ is real."""
    import importlib.util
    import re

    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "Makefile"]:
        text = doc.read_text()
        for path in set(re.findall(r"(?<![\w/])(stream_jobs/[\w/]+(?:\.py|/))", text)):
            if not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
        for module in set(re.findall(r"-m (stream_jobs(?:\.\w+)+)", text)):
            if importlib.util.find_spec(module) is None:
                missing.append(f"{doc.name}: python -m {module}")
    assert not missing, missing
