import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a stray hub call fails fast instead of hanging
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny SD1.5-shaped model built from configs."""
    from tiny_model import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def star_images(tmp_path_factory):
    """The ember_star concept's five references, as a user's image folder (no captions: templates)."""
    from PIL import Image

    from pristine.world.concepts import get_concept
    from pristine.world.render import render

    folder = tmp_path_factory.mktemp("star")
    for k, scene in enumerate(get_concept("ember_star").references(5)):
        Image.fromarray(render(scene)[0]).save(folder / f"{k}.png")
    return folder
