"""Train the chapter-4 models on Shakespeare bytes and save checkpoints + histories under data/moe/.

    python data/make_moe_checkpoints.py            # all four runs, one after another
    python data/make_moe_checkpoints.py moe_aux    # one run

Runs (same seed, same batches, same steps; byte-level, vocab 256):
    dense     tiny dense model, SwiGLU hidden 160
    moe_aux   8 experts of hidden 80, top-2 (the same active parameters per token as dense, plus
              a 64x8 router per layer), Switch auxiliary loss
    moe_none  the same MoE with no balancing at all (the collapse demo)
    moe_bias  the same MoE with DeepSeek-V3's auxiliary-loss-free bias balancing

The same with the CLI, one run (here moe_aux; --config tiny / tiny-moe-none / tiny-moe-bias for the others):
    python -m minillm train --config tiny-moe --steps 1500 --batch-size 16 --seq-len 64 --warmup 30 \
        --eval-every 50 --eval-steps 8 --out data/moe/moe_aux.safetensors --history data/moe/moe_aux.json

Each run writes data/moe/<name>.safetensors (train.save_checkpoint) and data/moe/<name>.json
(the history: losses per step, validation losses, per-layer expert load and its CV per step).
"""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minillm import moe  # noqa: E402
from minillm.model import Transformer, tiny, tiny_moe_presets  # noqa: E402
from minillm.train import TrainConfig, save_checkpoint, split, text_to_bytes, train  # noqa: E402

PRESETS = tiny_moe_presets()  # also what `python -m minillm train --config tiny-moe...` builds
RUNS = {"dense": tiny(vocab_size=256), "moe_aux": PRESETS["tiny-moe"], "moe_none": PRESETS["tiny-moe-none"],
        "moe_bias": PRESETS["tiny-moe-bias"]}
TRAIN = TrainConfig(steps=1500, batch_size=16, seq_len=64, warmup=30, eval_every=50, eval_steps=8)


def run(name: str, train_cfg: TrainConfig = TRAIN, progress: bool = True):
    """Train RUNS[name] from seed 0 -> (model, history)."""
    text = (ROOT / "data" / "shakespeare.txt").read_text(encoding="utf-8")
    train_data, val_data = split(text_to_bytes(text))
    torch.manual_seed(0)
    model = moe.track_aux_loss(Transformer(RUNS[name]))
    callback = moe.train_callback if RUNS[name].n_experts else None
    history = train(model, train_data, val_data, train_cfg, progress=progress, callback=callback)
    return model, history


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = ROOT / "data" / "moe"
    out.mkdir(exist_ok=True)
    for name in sys.argv[1:] or list(RUNS):
        model, history = run(name)
        save_checkpoint(model, out / f"{name}.safetensors")
        (out / f"{name}.json").write_text(json.dumps(history))
        print(f"{name}: val loss {history['val_loss'][-1]:.4f} in {history['seconds']:.0f} s")
