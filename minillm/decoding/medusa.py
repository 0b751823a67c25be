"""Medusa heads: guess the tokens 2, 3, 4 ... positions ahead from the model's last hidden state.

The model's own head reads the final hidden state h_t and predicts token t+1. Medusa adds a few
cheap heads on the same h_t, head d predicting token t+2+d:

    logits_d = output(h_t + silu(W_d h_t))     one residual block each, W_d zero-initialised,
                                               sharing SmolLM2's (tied) output matrix

Each head costs one 576x576 matmul plus the shared vocabulary projection. The heads' top-k choices
fill a static tree (`Template`), verified in one forward by tree.py.

Training is self-distillation (Medusa-1 with a frozen backbone): SmolLM2 greedily continues some
prompts (decoding.decode with keep_hidden=True returns the hidden states it computed on the way),
and head d learns to predict SmolLM2's own token d+2 positions ahead, so it learns the model's
distribution, not a dataset's. `data/train_medusa.py` runs it (`--smoke` for a quick run).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..assets import ASSETS
from .tree import Template, Tree


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)  # starts as the identity: head d first guesses what the model's head would
        nn.init.zeros_(self.linear.bias)

    def forward(self, h):
        return h + F.silu(self.linear(h))


class MedusaHeads(nn.Module):
    def __init__(self, dim: int, n_heads: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(dim) for _ in range(n_heads))

    def forward(self, hidden, output: nn.Module):
        """hidden (..., dim) -> logits (n_heads, ..., vocab); head d guesses the token d+2 ahead."""
        return torch.stack([output(block(hidden)) for block in self.blocks])


def template_from_accuracy(accuracy, size: int) -> Template:
    """Medusa's tree tuning: accuracy[d][i] = measured rate at which head d's i-th choice is right.
    A path's expected value is the product of its choices' rates; keep the `size - 1` best paths
    (a path is never better than its parent, so the kept set is a tree)."""
    depth, k = len(accuracy), len(accuracy[0])
    scored, frontier = [], [((), 1.0)]
    for d in range(depth):
        frontier = [(p + (i,), v * float(accuracy[d][i])) for p, v in frontier for i in range(k)]
        scored += frontier
    scored.sort(key=lambda pv: (-pv[1], len(pv[0]), pv[0]))
    kept = set()
    for path, _ in scored:
        if len(kept) == size - 1:
            break
        if path[:-1] == () or path[:-1] in kept:
            kept.add(path)
    return Template.from_paths(kept)


class MedusaDrafter:
    """Fills `template` from the heads' top-k at the last accepted node's hidden state."""

    def __init__(self, model, heads: MedusaHeads, template: Template, k: int = 8):
        if template.depth() > len(heads.blocks):
            raise ValueError(f"template depth {template.depth()} needs that many heads; have {len(heads.blocks)}")
        if max(template.choices) >= k:
            raise ValueError(f"template asks for choice {max(template.choices)}; only top-{k} is computed")
        self.model, self.heads, self.template, self.k = model, heads, template, k

    @property
    def default_len(self) -> int:
        return len(self.template) - 1

    def propose(self, context, k, hidden=None, **sampling) -> Tree:
        """hidden: the final hidden state (dim,) at the last token, which the decoding loop hands over
        (None in the first round, before the model has seen that token: then nothing is proposed)."""
        if hidden is None:
            return Tree.chain(context[-1], [])
        guesses = self.heads(hidden, self.model.output).topk(self.k, dim=-1).indices.tolist()  # (n_heads, k)
        return self.template.fill(context[-1], lambda token, depth: guesses[depth]).prefix(k + 1)

    def observe(self, tree, logits, hidden=None):
        pass  # Medusa's heads are static


# ----------------------------------------------------------------------------- self-distillation
def head_targets(hidden, seqs, prompt_len: int, n_heads: int):
    """Pairs (h_t, token t+2+d) over the generated part, for every head d: lists of (X (n, dim), y (n,))."""
    pairs = []
    for d in range(n_heads):
        first, last = prompt_len - 1, seqs.shape[1] - 2 - d          # h_t needs a target at t + 2 + d
        pairs.append((hidden[:, first:last].reshape(-1, hidden.shape[-1]), seqs[:, first + 2 + d:last + 2 + d].reshape(-1)))
    return pairs


def train_heads(model, heads: MedusaHeads, pairs, steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 0,
                log_every: int = 0):
    """Cross-entropy of each head on its targets; the backbone and the shared output matrix stay frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        loss = 0.0
        for block, (X, y) in zip(heads.blocks, pairs):
            idx = torch.randint(len(y), (batch,), generator=g)
            loss = loss + F.cross_entropy(model.output(block(X[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item() / len(pairs))
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {losses[-1]:.3f}", flush=True)
    return losses


@torch.inference_mode()
def head_accuracy(model, heads: MedusaHeads, pairs, k: int = 8):
    """accuracy[d][i] = fraction of positions where head d's i-th choice is the model's token (t+2+d)."""
    rows = []
    for block, (X, y) in zip(heads.blocks, pairs):
        top = model.output(block(X)).topk(k, dim=-1).indices                       # (n, k)
        rows.append((top == y[:, None]).float().mean(0).tolist())
    return rows


def save_heads(heads: MedusaHeads, path):
    save_file({k: v.half().contiguous() for k, v in heads.state_dict().items()}, str(path),
              metadata={"n_heads": str(len(heads.blocks))})


def load_heads(path, dim: int = 576) -> MedusaHeads:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no Medusa heads here; train them with `python data/train_medusa.py`")
    with safe_open(str(path), "pt") as f:
        n_heads = int(f.metadata()["n_heads"])
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    heads = MedusaHeads(dim, n_heads)
    heads.load_state_dict(state)
    return heads.eval()


HEADS = ASSETS / "medusa_smollm2.safetensors"  # shipped with the package, made by data/train_medusa.py


def default_medusa_drafter(model, size: int = 10, path=None) -> MedusaDrafter:
    """SmolLM2's committed heads with a `size`-node tree tuned on their measured held-out accuracy."""
    path = Path(path or HEADS)
    heads = load_heads(path, model.config.dim).to(next(model.parameters()).dtype)  # the model's dtype
    accuracy = json.loads(path.with_suffix(".json").read_text())["held_out_accuracy"]
    return MedusaDrafter(model, heads, template_from_accuracy(accuracy, size), k=len(accuracy[0]))
