"""Write constraints.txt: the version of every runtime dependency of the project (its
[project].dependencies with their extras, and theirs, all the way down) as installed in the
environment that runs this script, the one the tests ran in. The Dockerfile installs with
``pip install -c constraints.txt``, so the image holds the versions that were tested.

    python scripts/freeze_constraints.py                 # rewrite constraints.txt
    python scripts/freeze_constraints.py --check         # exit 1 if constraints.txt differs

Left out: the test extra, and torch's CUDA libraries (``nvidia-*``, ``triton``), which the
image's CPU-only torch does not use.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "fl-privacy-testbed"
OUT = ROOT / "constraints.txt"
HEADER = (
    "# The tested versions of the runtime dependencies (pip freeze of the test environment, runtime deps only).\n"
    "# Made by: python scripts/freeze_constraints.py   (tests/test_compose.py checks it is current)\n"
    "# Used by the Dockerfile: pip install -c constraints.txt ...\n"
)


def _cuda_only(name: str) -> bool:
    return name.startswith("nvidia-") or name == "triton"


def runtime_versions(project: str = PROJECT) -> dict[str, str]:
    """{canonical name: installed version} for the runtime dependency closure of ``project``."""
    found: dict[str, str] = {}
    extras_seen: dict[str, set[str]] = {}

    def walk(name: str, extras: frozenset[str]) -> None:
        key = canonicalize_name(name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            return
        todo = set(extras) - extras_seen.get(key, set())
        if key in found and not todo:
            return
        found[key] = dist.version
        extras_seen.setdefault(key, set()).update(extras)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                continue
            walk(req.name, frozenset(req.extras))

    walk(project, frozenset())
    found.pop(canonicalize_name(project), None)
    return {k: v for k, v in sorted(found.items()) if not _cuda_only(k)}


def render(versions: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in versions.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/freeze_constraints.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if constraints.txt is not current")
    args = p.parse_args(argv)
    text = render(runtime_versions())
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT.name} is not current: run python scripts/freeze_constraints.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({text.count('==')} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
