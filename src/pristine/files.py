"""The user's files, handled safely: durable atomic writes, safetensors-only reading, writable targets.

Every writer here goes through a temporary name, fsyncs it and renames it, so a kill or a power cut
leaves either the old file or the new one. Nothing here unpickles.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ALLOW_PICKLE = "--allow-pickle"
PROBE_PREFIX = ".tmp-pristine-probe-"  # the file check_writable_folder makes and removes at once


def durable_replace(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it to `path`, fsync the folder (so the rename itself survives a power cut)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a folder; the rename is atomic all the same
    finally:
        os.close(fd)


def replace_folder(final: Path, write) -> Path:
    """`write(folder)` fills a temporary folder beside `final`, which then takes final's place: an error
    or a stop while writing leaves the old folder (or none) and no half-written one. The temporaries'
    names end in `.tmp`, so `remove_temporaries` clears what a kill left."""
    final = Path(final)
    tmp, old = final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half-written folder behind
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        durable_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial temporary behind


def remove_temporaries(folder: Path) -> list[Path]:
    """What a killed writer of ours left in a run folder: `*.tmp` files and `.*.tmp` folders (and the
    `.tmpXXXX` names some writers use). Returns what was removed."""
    removed = []
    for where in (folder, folder / "checkpoints", folder / "samples"):
        if not where.is_dir():
            continue
        for p in where.iterdir():
            if p.name.endswith(".tmp") or p.name.endswith(".tmp.png") or p.name.startswith(".tmp"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p)
    return removed


def check_safetensors(path: str | Path, what: str) -> None:
    """One line naming `path` when it is not a complete safetensors file (corrupt header, truncated, a pickle).

    The header and the data's extent are checked against the file size; a flipped bit inside the
    tensors cannot be seen, safetensors stores no checksum."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(f"{what} {path}: a pickle file; pristine reads safetensors only, since a pickle can run code")
    problem = safetensors_problem(path)
    if problem:
        raise UsageError(f"{what} {path}: not a complete safetensors file ({problem}); replace it with an intact copy")


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None when it is."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:  # safetensors' own error types: header, offsets, truncation; or a vanished file
        return (str(e).splitlines() or [type(e).__name__])[0][:100]
    return None


def check_model_weights(folder: Path, allow_pickle: bool = False) -> None:
    """Every weights file of a model folder (and its component sub-folders) before anything loads it:
    safetensors intact, and a component with only pickled weights refused unless `allow_pickle`."""
    for part in [folder] + sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in part.iterdir() if p.is_file())
        safe = [p for p in files if p.suffix == ".safetensors"]
        pickles = [p for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
        for p in safe:
            check_safetensors(p, "model weights")
        if pickles and not safe and not allow_pickle:
            raise UsageError(f"{pickles[0]}: pickled weights only (no .safetensors); a pickle can run code, so pristine "
                             f"does not load it unless you pass {ALLOW_PICKLE} (or convert the folder to safetensors)")


def is_empty_folder(folder: Path) -> bool:
    """No entries but, perhaps, another process's writability probe of the moment."""
    return not any(not p.name.startswith(PROBE_PREFIX) for p in folder.iterdir())


def check_writable_folder(folder: Path, flag: str) -> None:
    """Before any work: `folder` (or the nearest part of it that exists) is a folder this user can write in."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{flag} {folder}: {probe} is a file, not a folder; give a folder path")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=PROBE_PREFIX)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot write in {probe} ({e.strerror or e}); give a writable path")
