"""One benchmark in several processes: each takes a slice of the concepts (`--part I/N`), trains and
draws them into the shared bench folder, one CPU thread each; then the parent scores the whole from
what is on disk. Why processes: a CPU step of these small models gains 1.24x from a second thread,
a second process nearly 2x. Nothing else differs: every (method, concept) is trained and drawn with
its own seed, so the pictures are the ones a single process draws."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from ..errors import UsageError


def parse_part(text: str | None) -> tuple[int, int] | None:
    """`--part I/N` (1-based) -> (I - 1, N)."""
    if text is None:
        return None
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise UsageError(f"--part: {text!r} is not I/N with 1 <= I <= N (for example 1/2)")
    return int(index) - 1, int(count)


def my_slice(items: list, part: tuple[int, int] | None) -> list:
    return items if part is None else items[part[0] :: part[1]]


def pieces_drawn(out: Path, rows: list[str], names: list[str], what: str, fingerprint: str | None = None) -> str:
    """How far a bench folder is: the pictures of each (row, name) piece are out/samples/ROW/NAME.npz
    in every bench that runs in parts; with `fingerprint`, pictures drawn under other settings (which
    the bench draws again) do not count."""
    import zipfile

    from .minibench import _load_cached

    def drawn_now(path: Path) -> bool:
        if fingerprint is None:
            return path.is_file()
        try:
            return _load_cached(path, fingerprint) is not None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # damaged: drawn again
            return False

    drawn = sum(drawn_now(out / "samples" / row / f"{name}.npz") for row in rows for name in names)
    return f"{drawn} of {len(rows) * len(names)} {what} pieces drawn"


def without_workers(argv: list[str]) -> list[str]:
    """The command line without its --workers flag, for the worker processes."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--workers":
            skip = True
        elif not token.startswith("--workers="):
            out.append(token)
    return out


def run_parts(argv: list[str], workers: int, out: Path, done: Callable[[], str], poll_s: float = 30.0) -> None:
    """Run the pristine command line `argv` (its --workers left out) in `workers` processes, the i-th
    with `--part i/workers`; logs in out/logs/; `done()` says how far the whole is, every poll."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
    procs = []
    for i in range(1, workers + 1):
        log = logs / f"part-{i}-of-{workers}.log"
        with open(log, "ab") as handle:
            procs.append((log, subprocess.Popen([sys.executable, "-m", "pristine.cli", *without_workers(argv), "--part", f"{i}/{workers}"],
                                                stdout=handle, stderr=subprocess.STDOUT, env=env)))
    print(f"{workers} processes, logs in {logs}", flush=True)
    try:
        last = time.monotonic()
        while any(p.poll() is None for _, p in procs):
            time.sleep(0.5)
            if time.monotonic() - last >= poll_s:
                last = time.monotonic()
                print(f"[{time.strftime('%H:%M:%S')}] {done()}", flush=True)
    except KeyboardInterrupt:
        for _, p in procs:
            p.terminate()
        raise
    failed = [(log, p.returncode) for log, p in procs if p.returncode != 0]
    if failed:
        log, code = failed[0]
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise UsageError(f"a part stopped (exit {code}): {tail[0]} (see {log}); run the same command again to resume")
