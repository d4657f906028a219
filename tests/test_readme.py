"""The README is the product's front door: it must document every setting the code reads."""

from __future__ import annotations

import re
from pathlib import Path

from stream_jobs.settings import readme_with_settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_settings_block_is_what_the_code_generates():
    assert readme_with_settings(README) == README, "run `python -m stream_jobs.settings --readme`"


def test_every_environment_variable_the_code_reads_is_documented():
    names = set()
    for path in (ROOT / "stream_jobs").rglob("*.py"):
        names |= set(re.findall(r"\b((?:STORMGUARD|GRAFANA)_[A-Z0-9_]*[A-Z0-9])\b", path.read_text()))
    documented = set(re.findall(r"\b((?:STORMGUARD|GRAFANA)_[A-Z0-9_]*[A-Z0-9])", README))
    # Families documented with a shared prefix, e.g. `STORMGUARD_KAFKA_SSL_CAFILE, _SSL_CERTFILE`.
    prefixes = {"STORMGUARD_KAFKA_SSL_", "STORMGUARD_KAFKA_SASL_"}
    missing = {n for n in names - documented
               if not any(n.startswith(p) for p in prefixes) and not n.endswith("_FILE")}
    assert not missing, f"settings read by the code but not in the README: {sorted(missing)}"


def test_quickstart_is_the_two_commands():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^make \w+", quickstart, flags=re.M)
    assert commands == ["make demo", "make test"]
