"""Which addresses are lists, and how many members each has: read from Postfix ``virtual(5)`` alias tables.

The Postfix adapters need a list's member count to tell a post to a list from
direct mail (``stormguard ingest postfix-log --lists``).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional


class ListMapError(ValueError):
    """The list map cannot be read; the message names the file and line."""


def read_virtual_lists(lines: Iterable[str], min_members: int = 2, source: str = "<lists>") -> dict[str, int]:
    """List address → member count from a Postfix ``virtual(5)`` alias table.

    Every ``user@domain`` key whose expansion (recursive, through the same
    table, the way Postfix expands virtual aliases) reaches at least
    ``min_members`` distinct final addresses is a list. Domain-only keys
    (``example.com anything``) and catch-alls (``@example.com``) are not lists.

    >>> read_virtual_lists([
    ...     "# all staff",
    ...     "all@lists.example  ward1@lists.example, boss@example",
    ...     "ward1@lists.example  a@example, b@example,",
    ...     "    c@example",
    ...     "lists.example  anything",
    ...     "postmaster@lists.example  boss@example",
    ... ])
    {'all@lists.example': 4, 'ward1@lists.example': 3}
    """
    table: dict[str, list[str]] = {}
    key: Optional[str] = None
    for lineno, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if key is None:
                raise ListMapError(f"{source}:{lineno}: continuation line before any entry")
            table[key].extend(_addresses(stripped))
            continue
        parts = stripped.split(None, 1)
        if len(parts) < 2:
            raise ListMapError(f"{source}:{lineno}: entry {parts[0]!r} has no result")
        key = parts[0].lower()
        table.setdefault(key, []).extend(_addresses(parts[1]))

    counts: dict[str, int] = {}
    for name in table:
        if "@" not in name or name.startswith("@"):
            continue
        n = len(_expand(name, table))
        if n >= min_members:
            counts[name] = n
    return counts


def _addresses(text: str) -> list[str]:
    return [a.lower() for a in re.split(r"[\s,]+", text) if a]


def _expand(name: str, table: Mapping[str, list[str]], limit: int = 1000) -> set[str]:
    """Final addresses of ``name``: iterative, cycle-safe; an alias listing itself keeps itself."""
    leaves: set[str] = set()
    seen = {name}
    stack = [(name, 0)]
    while stack:
        addr, depth = stack.pop()
        for target in table.get(addr, ()):
            if target == addr or target not in table or depth >= limit:
                leaves.add(target)
            elif target not in seen:
                seen.add(target)
                stack.append((target, depth + 1))
    return leaves


def load_list_files(paths: Iterable[str], min_members: int = 2) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                counts.update(read_virtual_lists(fh, min_members=min_members, source=path))
        except OSError as exc:
            raise ListMapError(f"{path}: {exc.strerror}") from None
    return counts
