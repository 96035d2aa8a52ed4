"""The DreamBench protocol (Ruiz et al. 2023): 30 subjects, 25 prompts each, 4 images per prompt."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UsageError

LIVE_CLASSES = ("cat", "dog")
IMAGES_PER_PROMPT = 4


def shared_dir() -> Path:
    """../shared/dreambench beside the checkout (read-only)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "dreambench"
        if candidate.is_dir():
            return candidate
    raise UsageError("DreamBench files not found (../shared/dreambench); pass --references and --prompts-file")


def parse(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """(subject -> class, object prompt templates, live-subject prompt templates) from prompts_and_classes.txt."""
    text = path.read_text()
    classes = dict(re.findall(r"^([a-z0-9_]+),([a-z ]+)$", text.split("Prompts")[0], flags=re.M))
    classes.pop("subject_name", None)
    sections = text.split("Live Subject Prompts")
    templates = [re.findall(r"'(.+?)'\.format", part) for part in sections]
    if len(templates) != 2 or not all(len(t) == 25 for t in templates):
        raise UsageError(f"{path}: expected 25 object and 25 live-subject prompts")
    return classes, templates[0], templates[1]


def prompts_for(subject: str, token: str, path: Path | None = None) -> tuple[str, list[str]]:
    """The subject's class and its 25 prompts with the token in place."""
    classes, objects, live = parse(path or shared_dir() / "prompts_and_classes.txt")
    if subject not in classes:
        raise UsageError(f"--subject {subject!r} is not a DreamBench subject; choose one of {', '.join(sorted(classes))}")
    cls = classes[subject]
    templates = live if cls in LIVE_CLASSES else objects
    return cls, [t.format(token, cls) for t in templates]
