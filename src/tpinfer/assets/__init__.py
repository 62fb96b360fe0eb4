"""Files shipped with tpinfer: the demo model (see demo-llama/MODEL_CARD.md)."""

from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parent / "demo-llama"


def demo_model_path() -> str:
    if not (DEMO_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the demo model is missing from {DEMO_MODEL}; run scripts/train_demo_model.py")
    return str(DEMO_MODEL)
