"""Run the chosen parts and write the report: `python -m bench.report [--only PARTS] [--quick]`."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from . import __doc__ as package_doc
from .common import (
    REPO,
    Context,
    Section,
    SshdPool,
    log,
)
from .part_download import part_download
from .part_fanout import TITLE as FANOUT_TITLE
from .part_fanout import part_fanout
from .part_infer import part_infer
from .part_llama import part_llama
from .part_relay import part_relay
from .part_sftp import part_sftp
from .part_status import part_status
from .part_worker import part_worker
from .render import handoff_probe, machine_line, render

PARTS = ("worker", "llama", "relay", "infer", "status", "sftp", "download", "fanout")


RUNNERS: dict[str, Callable[[Context], Section]] = {
    "worker": part_worker,
    "llama": part_llama,
    "relay": part_relay,
    "infer": part_infer,
    "status": part_status,
    "sftp": part_sftp,
    "download": part_download,
    "fanout": part_fanout,
}
TITLES = {
    "worker": "1. Worker SSE vs the runtime in process",
    "llama": "2. rbee worker vs `llama_cpp.server` on SmolLM2",
    "relay": "3. Queen relay vs the worker directly",
    "infer": "4. `rbee-keeper infer`: cold vs warm, by phase",
    "status": "5. `rbee-keeper status` fan-out over 1/2/4/8 sshd nodes",
    "sftp": "6. SFTP push vs `scp`",
    "download": "7. Hive download vs `curl`",
    "fanout": FANOUT_TITLE,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report",
        description=package_doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only", help=f"comma-separated parts to run (default: all): {', '.join(PARTS)}", default=""
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions (for iterating, not for the docs)"
    )
    parser.add_argument(
        "--out",
        help="markdown file to write (default: docs/benchmarks.md for a full run, stdout with --only); "
        "plots go to img/ beside it",
    )
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()] or list(PARTS)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.out is None and not args.only:
        args.out = str(REPO / "docs" / "benchmarks.md")
    return args


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop what was started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    shown = sys.executable if os.path.isabs(sys.executable) else "python"
    command = shlex.join([shown, "-m", "bench.report", *(argv if argv is not None else sys.argv[1:])])
    started_at = dt.datetime.now(dt.UTC)
    started = time.monotonic()
    machine = machine_line()
    sections: list[Section] = []
    with tempfile.TemporaryDirectory(prefix="rbee-report-") as tmp_name:
        tmp = Path(tmp_name)
        if args.out and args.out != "-":
            out: Path | None = Path(args.out)
            img_dir, img_prefix = out.parent / "img", "img"
        else:  # markdown on stdout: plots in a directory of their own that outlives this run
            out = None
            img_dir = Path(tempfile.mkdtemp(prefix="rbee-report-img-"))
            img_prefix = str(img_dir)
        img_dir.mkdir(parents=True, exist_ok=True)
        pool = SshdPool(tmp / "sshd")
        ctx = Context(tmp, img_dir, img_prefix, args.quick, pool)
        try:
            for part in args.parts:
                log(f"part {part}: start")
                t0 = time.monotonic()
                try:
                    section = RUNNERS[part](ctx)
                except Exception:  # one failing part must not hide the others
                    section = Section(part, TITLES[part], error=traceback.format_exc())
                    log(f"part {part}: FAILED\n{section.error}")
                section.seconds = time.monotonic() - t0
                sections.append(section)
                log(f"part {part}: {section.seconds:.0f} s")
        finally:
            pool.close()
        load = os.getloadavg()
        end_load = f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, {handoff_probe()}"
        text = render(sections, command, started_at, time.monotonic() - started, machine, end_load)
        if out is None:
            print(text)
            log(f"plots in {img_dir}")
        else:
            out.write_text(text)
            log(f"wrote {out} and {len(list(img_dir.glob('bench-*.png')))} plots in {img_dir}")
    log(f"took {time.monotonic() - started:.0f} s")
    return 1 if any(s.error for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
