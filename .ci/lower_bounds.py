#!/usr/bin/env python3
"""Print a pip constraints file pinning each direct dependency of pyproject.toml to its lower bound.

    python3 .ci/lower_bounds.py [--extras dev,plots | --all-extras] [--skip torch] [-o FILE]

Every requirement of ``[project] dependencies`` (and of the extras asked for) must carry a lower
bound (``>=X``, ``==X`` or ``~=X``); the line written for it is ``name==X`` with the requirement's
environment marker kept. A requirement on the project itself (``psa-diffusers[interpret]`` inside
``dev``) is followed into those extras. A name given more than once gets its highest lower bound.
``--skip NAME`` leaves a dependency out (CI keeps the CPU build of torch it installed first).

``pip install --dry-run -c FILE ".[extras]"`` then proves that the declared lower bounds can be
installed together. Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_REQ = re.compile(
    r"""^\s*(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*
        (?:\[(?P<extras>[^\]]*)\])?\s*
        (?P<spec>[^;@]*?)\s*
        (?:;\s*(?P<marker>.+?))?\s*$""",
    re.VERBOSE,
)
_CLAUSE = re.compile(r"^(===|==|~=|!=|<=|>=|<|>)\s*(\S+)$")


def normalize(name: str) -> str:
    """PEP 503 name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def version_key(v: str) -> tuple:
    """Order plain release versions (1.26, 6.0.1); enough to pick the higher of two lower bounds."""
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.+-]", v))


def lower_bound(req: str) -> tuple[str, str, str | None]:
    """(normalized name, lower-bound version, marker or None) of one requirement string."""
    m = _REQ.match(req)
    if not m:
        raise ValueError(f"cannot parse requirement {req!r}")
    lows = []
    for clause in filter(None, (c.strip() for c in m["spec"].split(","))):
        c = _CLAUSE.match(clause)
        if not c:
            raise ValueError(f"cannot parse {clause!r} in {req!r}")
        op, ver = c.groups()
        if op in (">=", "==", "~=", "==="):
            if "*" in ver:
                raise ValueError(f"{req!r}: a wildcard bound {clause!r} has no single lowest version")
            lows.append(ver)
        elif op == ">":
            raise ValueError(f"{req!r}: write the lower bound as '>=' (the lowest allowed release), not '>'")
    if not lows:
        raise ValueError(f"{req!r} has no lower bound: give every direct dependency one ('>=X')")
    return normalize(m["name"]), max(lows, key=version_key), m["marker"]


def direct_requirements(project: dict, extras: list[str]) -> list[str]:
    """The requirement strings of the project and of the extras, self-references followed."""
    me = normalize(project["name"])
    optional = project.get("optional-dependencies", {})
    out, done, todo = [], set(), [None, *extras]  # None: [project] dependencies
    while todo:
        extra = todo.pop(0)
        if extra in done:
            continue
        done.add(extra)
        if extra is not None and extra not in optional:
            raise ValueError(f"no extra {extra!r} in pyproject.toml (there are: {', '.join(optional)})")
        for req in project.get("dependencies", []) if extra is None else optional[extra]:
            m = _REQ.match(req)
            if m and normalize(m["name"]) == me:  # e.g. dev = ["psa-diffusers[interpret]"]
                todo += [e.strip() for e in (m["extras"] or "").split(",") if e.strip()]
            else:
                out.append(req)
    return out


def constraints(pyproject: Path, extras: list[str] | None, all_extras: bool, skip: set[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    if all_extras:
        extras = list(project.get("optional-dependencies", {}))
    pins: dict[tuple[str, str | None], str] = {}
    for req in direct_requirements(project, extras or []):
        name, low, marker = lower_bound(req)
        if name in skip:
            continue
        key = (name, marker)
        if key not in pins or version_key(low) > version_key(pins[key]):
            pins[key] = low
    return [f"{name}=={low}" + (f"; {marker}" if marker else "") for (name, marker), low in sorted(pins.items())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parent.parent / "pyproject.toml")
    ap.add_argument("--extras", default="", help="comma-separated extras whose requirements are pinned too")
    ap.add_argument("--all-extras", action="store_true", help="pin the requirements of every extra")
    ap.add_argument("--skip", action="append", default=[], help="a dependency to leave out (repeatable)")
    ap.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = ap.parse_args(argv)
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    try:
        lines = constraints(args.pyproject, extras, args.all_extras, {normalize(s) for s in args.skip})
    except ValueError as exc:
        print(f"lower_bounds.py: {exc}", file=sys.stderr)
        return 1
    text = "".join(line + "\n" for line in lines)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
