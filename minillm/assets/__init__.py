"""The small files the package needs at run time, shipped in the wheel beside the code (no repository needed):

    calibration.txt                  GPTQ/AWQ's calibration mixture (chapter 3; made by data/make_calibration.py)
    heldout.txt, heldout_code.txt    held-out prose and code for perplexity (chapters 2, 3, 8; data/prepare_heldout.py)
    recycling_warm.txt               the text Token Recycling's matrix is warmed on (chapters 5-6; data/make_recycling_warm.py)
    medusa_smollm2.safetensors/.json SmolLM2's Medusa heads and their held-out accuracy (chapter 6; data/train_medusa.py)
    smollm2_draft.safetensors        the distilled draft model (chapter 5; data/distill_draft.py)

The scripts that make them live in the repository's data/ and write here.
"""
from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def asset(name: str) -> Path:
    """The path of a shipped file; a clear error if this install lacks it."""
    path = ASSETS / name
    if not path.is_file():
        raise FileNotFoundError(f"{name}: not among minillm's packaged files ({ASSETS}); reinstall minillm")
    return path
