"""Train a small model from scratch: byte-level data, AdamW, warmup + cosine, safetensors checkpoints.

    data = text_to_bytes(open("data/shakespeare.txt").read())      # (N,) byte ids, vocab 256
    train_data, val_data = split(data, val_fraction=0.1)
    torch.manual_seed(0)
    model = Transformer(tiny(vocab_size=256))
    history = train(model, train_data, val_data, TrainConfig(steps=50))
    save_checkpoint(model, "data/tiny_shakespeare.safetensors")

The tokenizer here is the identity on UTF-8 bytes, so any text trains a `vocab_size=256` model
with nothing to download. Checkpoints are safetensors (tensors and a JSON header; loading one
runs no code, unlike pickle) with the model's Config as JSON in the header's metadata.

Hook for later chapters: if the model sets a tensor attribute `aux_loss` during its forward
(a mixture-of-experts load-balancing loss, say), the loop adds it to the loss it minimises and
logs it; `callback(step, model)`, called after each optimizer step, may return a dict of extra
numbers (per-expert load) that is recorded with its step in `history["metrics"]`, and may also
update state that gradients do not (the bias of aux-loss-free MoE balancing).

Not handled: gradient accumulation, mixed precision, multiple devices, resuming the optimizer
state (checkpoints hold weights only).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..timing import machine_settings
from .llama import Transformer
from .loading import ModelFileError, read_checkpoint


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128          # tokens per training sequence; at most the model's max_seq_len
    lr: float = 3e-3            # peak learning rate; high because the model is tiny
    min_lr: float = 3e-4        # where the cosine decay ends
    warmup: int = 30            # steps of linear warmup from ~0 to lr; Adam's early updates are noisy
    weight_decay: float = 0.1   # applied to matrices only, not to norm gains
    grad_clip: float = 1.0      # max global grad norm; None or 0 disables clipping
    eval_every: int = 50        # validation loss every this many steps (and at the last step)
    eval_steps: int = 10        # batches averaged per validation loss
    seed: int = 0               # seeds batch sampling; seed the model's init yourself

    def __post_init__(self):
        """Refuse settings that would train on nothing or on NaN (batch_size 0 averages an empty loss)."""
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.warmup < 0 or not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need warmup >= 0 and 0 <= min_lr <= lr with lr > 0, got warmup={self.warmup}, "
                             f"lr={self.lr}, min_lr={self.min_lr}")
        if self.weight_decay < 0 or (self.grad_clip is not None and self.grad_clip < 0):
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay}, {self.grad_clip}")


# ---------------------------------------------------------------------------------------------
# Byte-level data

def text_to_bytes(text: str) -> torch.Tensor:
    """Text -> 1-D LongTensor of its UTF-8 bytes: "hé" -> tensor([104, 195, 169])."""
    return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))


def bytes_to_text(ids) -> str:
    """Byte ids -> text; a multi-byte character cut in half shows as U+FFFD, not an error."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class ByteTokenizer:
    """The tokenizer of a model trained here: one token per UTF-8 byte (vocab 256), no special tokens."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes_to_text(ids)

    def min_tokens(self, text: str) -> int:
        return len(text.encode("utf-8"))


def split(data: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The first (1 - val_fraction) of data for training, the rest for validation.

    A contiguous cut, not a shuffle: shuffled windows of one text overlap, and the validation
    loss would partly measure memorised training text.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n_train = int(len(data) * (1 - val_fraction))
    return data[:n_train], data[n_train:]


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Random windows of data: inputs x (B, T) and targets y (B, T), y shifted one to the left."""
    if len(data) < seq_len + 1:
        raise ValueError(f"data has {len(data)} tokens; a sequence of seq_len={seq_len} needs {seq_len + 1}")
    starts = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)  # (B,)
    offsets = torch.arange(seq_len + 1)                                                # (T+1,)
    windows = data[starts[:, None] + offsets]                                          # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


# ---------------------------------------------------------------------------------------------
# Schedule and loss

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over cfg.warmup steps, then cosine decay to cfg.min_lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_steps = max(1, cfg.steps - 1 - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / decay_steps)  # 0 after warmup .. 1 at the last step
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def next_token_loss(model, x, y):
    """Mean cross-entropy of predicting y from x; logits (B, T, V) are flattened to (B*T, V)."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


@torch.no_grad()
def estimate_loss(model, data: torch.Tensor, cfg: TrainConfig) -> float:
    """Mean loss over cfg.eval_steps batches; the same batches every call, so evaluations compare."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    was_training = model.training
    model.eval()
    losses = [next_token_loss(model, *get_batch(data, cfg.batch_size, cfg.seq_len, generator)).item()
              for _ in range(cfg.eval_steps)]
    model.train(was_training)
    return sum(losses) / len(losses)


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW decaying the matrices (embeddings, projections) but not the 1-D norm gains, as GPT-2 did."""
    params = list(model.parameters())  # a tied weight appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


# ---------------------------------------------------------------------------------------------
# The loop

def train(model, train_data: torch.Tensor, val_data: torch.Tensor, cfg: TrainConfig | None = None,
          progress: bool = True, callback=None, threads: int | None = 1) -> dict:
    """Train model in place for cfg.steps steps; returns the history for plotting.

    threads: torch's intra-op threads while training (restored after); None leaves them as set.
    One by default: a tiny model's matmuls are too small to split, and on a shared CPU a second
    OpenMP thread waits on busy cores (measured on 2 shared cores under load: 0.26 s/step with
    one thread, 4.3 s/step with two).

    history = {"step": [...], "train_loss": [...], "lr": [...],        one entry per step
               "aux_loss": [...],                                       per step, if the model sets one
               "val_step": [...], "val_loss": [...],                    one entry per evaluation
               "metrics": [{"step": s, ...}, ...],                      what callback returned
               "seconds": wall time of the whole run,
               "settings": date, threads, CPU capability, torch version (timing.machine_settings)}
    train_loss is the language-model loss alone (without aux_loss), so curves compare across models.
    """
    cfg = cfg or TrainConfig()
    max_len = getattr(getattr(model, "config", None), "max_seq_len", cfg.seq_len)
    if cfg.seq_len > max_len:
        raise ValueError(f"seq_len={cfg.seq_len} is longer than the model's max_seq_len={max_len}")
    if cfg.steps < 1 or cfg.warmup < 0 or cfg.eval_every < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0, eval_every >= 1; got {cfg}")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train_loop(model, train_data, val_data, cfg, progress, callback)
    finally:
        torch.set_num_threads(previous_threads)


def _train_loop(model, train_data, val_data, cfg: TrainConfig, progress: bool, callback) -> dict:
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    history = {"step": [], "train_loss": [], "lr": [], "aux_loss": [], "val_step": [], "val_loss": [],
               "metrics": []}
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="train")
    for step in bar:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data, cfg.batch_size, cfg.seq_len, generator)
        lm_loss = next_token_loss(model, x, y)
        aux_loss = getattr(model, "aux_loss", None)  # set by the model's forward, e.g. MoE load balancing
        loss = lm_loss if aux_loss is None else lm_loss + aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

        history["step"].append(step)
        history["train_loss"].append(lm_loss.item())
        history["lr"].append(lr)
        if aux_loss is not None:
            history["aux_loss"].append(float(aux_loss.detach()))
        if callback is not None and (extra := callback(step, model)):
            history["metrics"].append({"step": step, **extra})
        if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
            history["val_step"].append(step)
            history["val_loss"].append(estimate_loss(model, val_data, cfg))
            bar.set_postfix(loss=f"{lm_loss.item():.3f}", val=f"{history['val_loss'][-1]:.3f}")
    history["seconds"] = time.perf_counter() - start
    history["settings"] = machine_settings()
    model.eval()
    return history


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors, the Config as JSON in the header

def save_checkpoint(model: Transformer, path) -> None:
    """Write model's weights and Config to a .safetensors file.

    A tied output head shares storage with the embedding; safetensors refuses to store one
    buffer twice, so it is written once (as tok_embeddings.weight) and re-tied on load.
    """
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("output.weight")
    metadata = {"format": "minillm", "config": json.dumps(asdict(model.config))}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)


def load_checkpoint(path) -> Transformer:
    """Read a checkpoint written by save_checkpoint -> a Transformer in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"checkpoint {path} not found; make one with "
                             f"`python -m minillm train --config tiny --out {path}`")
    config, state = read_checkpoint(path, "minillm checkpoint")
    model = Transformer(config)
    model.load_state_dict(state, strict=False)  # output.weight, if tied, already is tok_embeddings.weight
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Command line: python -m minillm train --config tiny --steps 300 --out data/tiny_shakespeare.safetensors
