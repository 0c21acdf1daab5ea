"""``python -m experiments.report FOLDER``: report.html (and summary.md, the figures) of a run
folder or a sweep folder, made again from its files: finished, stopped or killed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["report_folder", "main"]


def report_folder(folder: str | Path) -> Path:
    """Write the report of a run folder or a sweep folder from its files; returns report.html.
    Raises FileNotFoundError for a folder that holds neither (no config.json, no sweep.json)."""
    # the reports' modules (pandas, matplotlib) load here, not for --help
    from ..sweep.runner import report_sweep
    from .summary import report_run  # as above

    folder = Path(folder)
    if (folder / "sweep.json").is_file():
        return report_sweep(folder)
    if (folder / "config.json").is_file():
        return report_run(folder)
    raise FileNotFoundError(f"{folder} holds no run (no config.json) and no sweep (no sweep.json)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description="Write report.html (and summary.md, the figures) of a run folder or a sweep "
        "folder from its files: finished, stopped or killed.",
    )
    p.add_argument("folder", help="a run folder (config.json) or a sweep folder (sweep.json)")
    p.add_argument("--screenshot", metavar="PNG", help="also load the page in headless Chromium and save a screenshot")
    p.add_argument("--width", type=int, default=1280, help="the screenshot's width in CSS pixels (default: 1280)")
    p.add_argument(
        "--height",
        type=int,
        default=0,
        help="the screenshot's height (default 0: the whole page, at most 12,000 pixels)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="the screenshot's size relative to the page (default: 1)")
    args = p.parse_args(argv)
    from .browser import BrowserError, check_page  # after parsing, as report_folder's modules

    try:
        page = report_folder(args.folder)
    except FileNotFoundError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(page)
    if args.screenshot:
        try:
            check = check_page(
                page,
                screenshot=args.screenshot,
                width=args.width,
                height=args.height or 900,
                full_page=not args.height,
                scale=args.scale,
            )
        except BrowserError as exc:
            print(f"{p.prog}: error: {exc}", file=sys.stderr)
            return 1
        for problem in check.errors + [f"image not decoded: {alt}" for alt in check.broken_images]:
            print(f"{p.prog}: {problem}", file=sys.stderr)
        print(args.screenshot)
        return 1 if check.errors or check.broken_images else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
