"""`python -m minillm train`: the flags of minillm.model.train's TrainConfig, the checks on paths, the printing."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..model.llama import Transformer, tiny, tiny_moe_presets
from ..model.train import TrainConfig, save_checkpoint, split, text_to_bytes, train
from ..moe.layer import track_aux_loss, train_callback

TRAIN_FLAGS = [("steps", int, "optimizer steps"), ("batch_size", int, "sequences per step"),
               ("seq_len", int, "bytes per training sequence"), ("warmup", int, "steps of linear learning-rate warmup"),
               ("eval_every", int, "steps between validation estimates"),
               ("eval_steps", int, "batches per validation estimate"), ("seed", int, "seed of the weights and batches"),
               ("lr", float, "peak learning rate (AdamW)"), ("min_lr", float, "learning rate at the end of the cosine"),
               ("weight_decay", float, "AdamW weight decay"), ("grad_clip", float, "gradient norm clip")]


def add_train_args(p: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    p.add_argument("--config", default="tiny", choices=["tiny", *tiny_moe_presets()],
                   help="model preset (byte-level, vocab 256); tiny-moe*: chapter 4's mixtures of experts")
    p.add_argument("--history", default=None, help="also write the training history as JSON here")
    p.add_argument("--data", default="data/shakespeare.txt", help="a UTF-8 text file to train on")
    p.add_argument("--out", default=None, help="where to save the .safetensors checkpoint")
    for field, kind, text in TRAIN_FLAGS:
        p.add_argument("--" + field.replace("_", "-"), type=kind, default=getattr(defaults, field), help=text)
    p.add_argument("--threads", type=int, default=1, help="torch threads while training (0: leave torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def cmd_train(args: argparse.Namespace) -> int:
    """Train the tiny byte-level model on --data, print the losses and time, save to --out."""
    fields = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{name: getattr(args, name) for name in fields})
    data_path = Path(args.data)
    if not data_path.is_file():
        raise ValueError(f"training text {data_path} not found (data/shakespeare.txt is built by "
                         f"data/prepare_shakespeare.py)")
    for flag, out in (("--out", args.out), ("--history", args.history)):  # before training, not after
        if out and not Path(out).resolve().parent.is_dir():
            raise ValueError(f"{flag} {out}: directory {Path(out).resolve().parent} does not exist")
        if out and Path(out).is_dir():
            raise ValueError(f"{flag} {out} is a directory; give a file name")
    train_data, val_data = split(text_to_bytes(data_path.read_text(encoding="utf-8")))
    torch.manual_seed(cfg.seed)
    model = Transformer(tiny(vocab_size=256) if args.config == "tiny" else tiny_moe_presets()[args.config])
    callback = None
    if model.config.n_experts:  # the loop adds the MoE aux loss; the callback balances and logs expert load
        track_aux_loss(model)
        callback = train_callback
    history = train(model, train_data, val_data, cfg, progress=not args.no_progress, threads=args.threads,
                    callback=callback)
    if args.out:  # the checkpoint first: the costly result
        save_checkpoint(model, args.out)
    if args.history:
        Path(args.history).write_text(json.dumps(history))
    print(f"trained {model.num_params():,d} parameters for {cfg.steps} steps in {history['seconds']:.1f} s: "
          f"train loss {history['train_loss'][-1]:.3f}, val loss {history['val_loss'][-1]:.3f} "
          f"(nats per byte; uniform guessing is ln 256 = 5.545)")
    if args.out:
        print(f"saved {args.out}")
    return 0


def train_cli(argv=None) -> int:
    """`python -m minillm.cli.train ...`, the same as `python -m minillm train ...`."""
    parser = argparse.ArgumentParser(prog="python -m minillm train", description=cmd_train.__doc__)
    add_train_args(parser)
    return cmd_train(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(train_cli())
