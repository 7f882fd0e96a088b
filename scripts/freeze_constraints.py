#!/usr/bin/env python
"""Write constraints/ci.txt: the installed version of every package in medmamba[dev]'s dependency closure.

pyproject.toml states ranges (the lowest versions tested); CI installs with ``-c constraints/ci.txt`` so its
runs are reproducible. Run this in the environment CI should reproduce (after ``pip install -e ".[dev]"``):

    python scripts/freeze_constraints.py            # rewrites constraints/ci.txt
    python scripts/freeze_constraints.py --check    # exit 1 when the file differs from this environment
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import sys
import tomllib

from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "constraints", "ci.txt")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[str]) -> dict[str, str]:
    """canonical name -> installed version, following installed packages' requirements (markers evaluated,
    extras followed only where requested)."""
    todo = [(Requirement(r), ()) for r in requirements]
    found: dict[str, str] = {}
    seen = set()
    while todo:
        req, _ = todo.pop()
        key = (canonical(req.name), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue  # a marker-less optional requirement that is not installed: nothing to pin
        found[canonical(dist.metadata["Name"])] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append((sub, ()))
    return found


def render() -> str:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    reqs = list(project["dependencies"]) + list(project.get("optional-dependencies", {}).get("dev", []))
    pins = closure(reqs)
    pins.pop("medmamba", None)
    lines = ["# The pinned set CI installs: pip install -e \".[dev]\" -c constraints/ci.txt",
             "# pyproject.toml states the supported ranges; this file is one tested point inside them.",
             "# Regenerate with: python scripts/freeze_constraints.py (in the environment to reproduce).",
             f"# Python {sys.version.split()[0]}, Linux x86-64."]
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        with open(OUT) as fh:
            same = fh.read() == text
        print("constraints/ci.txt " + ("matches" if same else "differs from") + " this environment")
        return 0 if same else 1
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tmp = OUT + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, OUT)
    print(f"wrote {OUT} ({text.count(chr(10)) - 4} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
