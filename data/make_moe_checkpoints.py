"""Train the chapter-4 models on Shakespeare bytes and save checkpoints + histories under data/moe/.

    python data/make_moe_checkpoints.py            # all four runs, one after another
    python data/make_moe_checkpoints.py moe_aux    # one run
    python data/make_moe_checkpoints.py dense moe_aux --seeds 0 1 2   # the seed study (below)

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

The seed study (--seeds S ...): the same runs from other seeds (weights and batch order), each scored by
full_val_loss, the mean loss over the whole validation split in 64-byte windows (490k bytes, not 8 sampled
batches). It writes data/moe/seeds/<name>_s<seed>.json, without a checkpoint. Seed 0 is not retrained: its
record scores the committed checkpoint, which is that run.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minillm.moe import layer as moe  # noqa: E402
from minillm.model import Transformer, tiny, tiny_moe_presets  # noqa: E402
from minillm.model.perplexity import nll_sum  # noqa: E402
from minillm.timing import machine_settings  # noqa: E402
from minillm.model.train import TrainConfig, load_checkpoint, save_checkpoint, split, text_to_bytes, train  # noqa: E402

PRESETS = tiny_moe_presets()  # also what `python -m minillm train --config tiny-moe...` builds
RUNS = {"dense": tiny(vocab_size=256), "moe_aux": PRESETS["tiny-moe"], "moe_none": PRESETS["tiny-moe-none"],
        "moe_bias": PRESETS["tiny-moe-bias"]}
TRAIN = TrainConfig(steps=1500, batch_size=16, seq_len=64, warmup=30, eval_every=50, eval_steps=8)


def shakespeare_split():
    """(train bytes, validation bytes) of data/shakespeare.txt, as every run uses them."""
    return split(text_to_bytes((ROOT / "data" / "shakespeare.txt").read_text(encoding="utf-8")))


def run(name: str, train_cfg: TrainConfig = TRAIN, progress: bool = True, seed: int = 0):
    """Train RUNS[name] from `seed` (the weights' init and the batch order) -> (model, history)."""
    train_data, val_data = shakespeare_split()
    torch.manual_seed(seed)
    model = moe.track_aux_loss(Transformer(RUNS[name]))
    callback = moe.train_callback if RUNS[name].n_experts else None
    cfg = TrainConfig(**{**train_cfg.__dict__, "seed": seed})
    history = train(model, train_data, val_data, cfg, progress=progress, callback=callback)
    return model, history


def full_val_loss(model, val_data: torch.Tensor, context: int = 64) -> float:
    """Mean next-byte loss (nats) over the whole validation split, in consecutive windows of `context` bytes."""
    total, count = nll_sum(model, val_data, context=context, batch_size=64)
    return total / count


def seed_record(name: str, seed: int, out: Path) -> dict:
    """Train (or, for seed 0, load the committed checkpoint of) one run and write its score to `out`."""
    _, val_data = shakespeare_split()
    if seed == 0:
        model = load_checkpoint(ROOT / "data" / "moe" / f"{name}.safetensors")
        history = json.loads((ROOT / "data" / "moe" / f"{name}.json").read_text())
    else:
        model, history = run(name, seed=seed)
    record = {"name": name, "seed": seed, "steps": TRAIN.steps, "full_val_loss": full_val_loss(model, val_data),
              "full_val_bytes": len(val_data), "val_step": history["val_step"], "val_loss": history["val_loss"],
              "train_seconds": round(history["seconds"], 1),
              "settings": dict(history.get("settings", {}), scored=machine_settings()["date"],
                               source="the committed checkpoint" if seed == 0 else "trained by this script")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record))
    return record


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"runs to make (default: all of {', '.join(RUNS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="the seed study: score these seeds into data/moe/seeds/ instead of saving checkpoints")
    args = parser.parse_args()
    if unknown := [name for name in args.names if name not in RUNS]:
        parser.error(f"unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}")
    torch.set_num_threads(1)
    out = ROOT / "data" / "moe"
    out.mkdir(exist_ok=True)
    for name in args.names or list(RUNS):
        if args.seeds is not None:
            for seed in args.seeds:
                record = seed_record(name, seed, out / "seeds" / f"{name}_s{seed}.json")
                print(f"{name} seed {seed}: full validation loss {record['full_val_loss']:.4f}", flush=True)
            continue
        model, history = run(name)
        save_checkpoint(model, out / f"{name}.safetensors")
        (out / f"{name}.json").write_text(json.dumps(history))
        print(f"{name}: val loss {history['val_loss'][-1]:.4f} in {history['seconds']:.0f} s")
