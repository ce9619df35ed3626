"""Name -> entry tables shared by lcpose's registries (pose losses, test-time solvers).

`add(table, kind, name, entry, same)` registers an entry (ValueError on a second, different one;
`same(old)` says whether re-registering is the same entry, e.g. a module imported twice) and
`lookup(table, kind, name)` finds one (ValueError listing the registered names).
"""
from __future__ import annotations

from typing import Any, Callable, Dict

__all__ = ["add", "lookup"]


def add(table: Dict[str, Any], kind: str, name: str, entry: Any, same: Callable[[Any], bool]) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty str, got {name!r}")
    if name in table and not same(table[name]):
        raise ValueError(f"{kind} {name!r} is already registered ({table[name]!r})")
    table[name] = entry


def lookup(table: Dict[str, Any], kind: str, name: str) -> Any:
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(table))}") from None
