import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import VARIANTS, make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random checkpoint per variant (every family, and rope/window variants), each split over two
    safetensors files."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {variant: make_checkpoint(root / variant, variant) for variant in VARIANTS}
