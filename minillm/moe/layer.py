"""Mixture of experts: a router picks k of E SwiGLU experts per token; three ways to run them.

    x (N, D) --router--> probs (N, E) --top-k--> expert_idx (N, K), weight (N, K), renormalised
    y[n] = sum_j weight[n, j] * expert[expert_idx[n, j]](x[n])

Einsum / shape letters used below:
    N tokens (batch and time flattened)   D model width         H expert hidden width
    E routed experts                      K experts per token   A assignments (N*K, fewer if dropped)

Dispatch (running the chosen experts), each the same function of the same inputs:
    dispatch_loop    for each expert, gather its tokens, run it, scatter-add back   (the reference)
    dispatch_sorted  sort assignments by expert so each expert's rows are one contiguous segment,
                     then one grouped matmul over all segments (torch._grouped_mm)
    dispatch_dense   run every expert on every token, weight by a mostly-zero gate matrix (E times
                     the work; obviously correct)

Balancing the load: the Switch Transformer auxiliary loss E * sum_i f_i P_i, the router z-loss of
ST-MoE, a capacity factor that drops the assignments over an expert's capacity, always-on shared
experts (DeepSeekMoE) and auxiliary-loss-free balancing by a per-expert routing bias (DeepSeek-V3).

This file imports nothing from model/llama.py (model/llama.py imports MoE from here). Not handled: expert
parallelism (dist.py), sigmoid routers and node-limited routing (DeepSeek-V3), capacity
limits computed across devices.
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

BALANCE_MODES = ("aux", "bias", "none")


def swiglu(x, w1, w3, w2):
    """One expert: x (n, D), w1/w3 (H, D) gate/up, w2 (D, H) down -> (n, D). Same as model.FeedForward."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


# ---------------------------------------------------------------------------------------------
# Routing

def route(x, router_weight, k: int, bias=None):
    """x (N, D), router_weight (E, D) -> logits (N, E), probs (N, E), expert_idx (N, K), weight (N, K).

    The top-k experts by probability (plus `bias` if given: it moves the choice, never the weights,
    as in DeepSeek-V3). With k > 1 the k weights are renormalised to sum to 1 (Mixtral); with k = 1
    the raw probability is kept, as in Switch, because a renormalised weight would be always 1.0 and
    the router would get no gradient from the language-model loss.
    """
    logits = F.linear(x, router_weight)                                  # (N, E)
    probs = torch.softmax(logits.float(), dim=-1)                        # (N, E), float32 for stability
    scores = probs if bias is None else probs + bias
    expert_idx = scores.topk(k, dim=-1).indices                          # (N, K)
    weight = probs.gather(-1, expert_idx)                                # (N, K)
    if k > 1:
        weight = weight / weight.sum(-1, keepdim=True)
    return logits, probs, expert_idx, weight.to(x.dtype)


def expert_capacity(n_tokens: int, k: int, n_experts: int, capacity_factor: float) -> int:
    """How many assignments one expert accepts: ceil(capacity_factor * N * K / E). 1.0 = a perfect split."""
    return math.ceil(capacity_factor * n_tokens * k / n_experts)


def capacity_keep(expert_idx, n_experts: int, capacity: int):
    """expert_idx (N, K) -> keep (N, K) bool: False for assignments beyond their expert's capacity.

    Documented order (GShard's): all first choices in token order, then all second choices in token
    order, and so on; each expert accepts the first `capacity` assignments that reach it.
    Example, E=2, capacity=1, expert_idx [[0, 1], [0, 1]] -> [[True, True], [False, False]].
    """
    rank_major = expert_idx.T.reshape(-1)                                # (K*N,) choice 0 of every token first
    one_hot = F.one_hot(rank_major, n_experts)                           # (K*N, E)
    arrival = (one_hot.cumsum(0) * one_hot).sum(-1) - 1                  # (K*N,) 0 = first to reach its expert
    return (arrival < capacity).view(expert_idx.shape[1], -1).T          # (N, K)


# ---------------------------------------------------------------------------------------------
# Dispatch: (x (N, D), token_idx (A,), expert_idx (A,), weight (A,), w1/w3 (E, H, D), w2 (E, D, H)) -> (N, D)

def dispatch_loop(x, token_idx, expert_idx, weight, w1, w3, w2):
    """The reference: one expert at a time, only on the tokens routed to it."""
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        rows = (expert_idx == e).nonzero().squeeze(1)                    # this expert's assignments
        if rows.numel() == 0:
            continue
        tokens = token_idx[rows]
        y = y.index_add(0, tokens, swiglu(x[tokens], w1[e], w3[e], w2[e]) * weight[rows, None])
    return y


def segment_matmul(rows, weights, counts):
    """rows (A, I) grouped into consecutive segments of counts (E,) rows; weights (E, I, O) -> (A, O).

    Segment e is multiplied by weights[e]. torch._grouped_mm (private, torch >= 2.9, also on CPU)
    does all segments in one call; it needs rows 16-byte aligned, so other widths, dtypes and older
    builds fall back to a loop over segments.
    """
    aligned = all(n * rows.element_size() % 16 == 0 for n in (rows.shape[1], weights.shape[2]))
    if hasattr(torch, "_grouped_mm") and rows.dtype in (torch.float32, torch.bfloat16) and aligned:
        offsets = counts.cumsum(0).to(torch.int32)                       # (E,) end of each segment
        return torch._grouped_mm(rows, weights, offs=offsets)
    return segment_matmul_loop(rows, weights, counts)


def segment_matmul_loop(rows, weights, counts):
    """The same as segment_matmul with a Python loop over torch.split segments."""
    parts = torch.split(rows, counts.tolist())
    return torch.cat([part @ weights[e] for e, part in enumerate(parts)])


def expert_outputs_sorted(rows, expert_idx, w1, w3, w2, matmul=segment_matmul):
    """rows (A, D), each for expert expert_idx (A,) -> expert(rows) (A, D), in the input order.

    Sorting by expert makes each expert's rows one contiguous segment: one grouped matmul per
    weight instead of E small ones, and no (N, E) mask. Used by expert parallelism too.
    """
    order = torch.argsort(expert_idx, stable=True)                       # (A,) rows grouped by expert
    counts = torch.bincount(expert_idx, minlength=w1.shape[0])           # (E,) segment lengths
    grouped = rows[order]                                                # (A, D)
    gate = matmul(grouped, w1.transpose(1, 2), counts)                   # (A, H)
    up = matmul(grouped, w3.transpose(1, 2), counts)                     # (A, H)
    out_sorted = matmul(F.silu(gate) * up, w2.transpose(1, 2), counts)   # (A, D)
    return torch.empty_like(out_sorted).index_copy(0, order, out_sorted)  # undo the sort


def dispatch_sorted(x, token_idx, expert_idx, weight, w1, w3, w2, matmul=segment_matmul):
    """Sort-by-expert dispatch: gather each assignment's token, grouped matmul, weighted scatter-add."""
    out = expert_outputs_sorted(x[token_idx], expert_idx, w1, w3, w2, matmul)  # (A, D)
    return torch.zeros_like(x).index_add(0, token_idx, out * weight[:, None])


def dispatch_dense(x, token_idx, expert_idx, weight, w1, w3, w2):
    """Every expert on every token; the gate matrix (N, E) is zero where a token was not routed."""
    gates = x.new_zeros(x.shape[0], w1.shape[0]).index_put((token_idx, expert_idx), weight, accumulate=True)
    h = F.silu(torch.einsum("nd,ehd->neh", x, w1)) * torch.einsum("nd,ehd->neh", x, w3)  # (N, E, H)
    out = torch.einsum("neh,edh->ned", h, w2)                                            # (N, E, D)
    return torch.einsum("ne,ned->nd", gates, out)


DISPATCHES = {"loop": dispatch_loop, "sorted": dispatch_sorted, "dense": dispatch_dense}


# ---------------------------------------------------------------------------------------------
# Balancing losses

def switch_aux_loss(probs, expert_idx):
    """Switch Transformer load-balancing loss E * sum_i f_i * P_i; 1.0 when perfectly balanced.

    f_i: fraction of the N*K assignments that chose expert i (counts, no gradient);
    P_i: mean router probability of expert i (differentiable). Minimised by uniform routing.
    """
    n_experts = probs.shape[-1]
    f = torch.bincount(expert_idx.reshape(-1), minlength=n_experts).to(probs.dtype) / expert_idx.numel()  # (E,)
    return n_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits):
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2; keeps logits small, softmax stable."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def load_cv(load) -> float:
    """Coefficient of variation std/mean of per-expert token counts: 0 = even, sqrt(E-1) = one expert takes all."""
    load = torch.as_tensor(load, dtype=torch.float64)
    return float(load.std(unbiased=False) / load.mean())


# ---------------------------------------------------------------------------------------------
# The layer

def check_config(c):
    """The MoE fields of a model Config, checked; returns it."""
    if not 1 <= c.n_experts_active <= c.n_experts:
        raise ValueError(f"n_experts_active must be in 1..n_experts={c.n_experts}, got {c.n_experts_active}")
    if c.moe_balance not in BALANCE_MODES:
        raise ValueError(f"moe_balance must be one of {BALANCE_MODES}, got {c.moe_balance!r}")
    if c.moe_capacity_factor is not None and not c.moe_capacity_factor > 0:
        raise ValueError(f"moe_capacity_factor must be > 0 or None (dropless), got {c.moe_capacity_factor}")
    if c.n_shared_experts < 0:
        raise ValueError(f"n_shared_experts must be >= 0, got {c.n_shared_experts}")
    return c


class MoE(nn.Module):
    """Drop-in replacement for the SwiGLU FeedForward: x (B, T, D) -> (B, T, D).

    After each forward: `aux_loss` (balancing + z-loss, already scaled by their coefficients),
    `last_expert_idx` (N, K), `last_load` (E,) assignments the router made to each expert (before
    capacity dropping: what balancing should see), `last_dropped` (int) assignments dropped.
    """

    def __init__(self, config):
        super().__init__()
        c = check_config(config)
        self.config, E, H, D = c, c.n_experts, c.hidden_dim, c.dim
        self.router = nn.Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, H, D) * 0.02)  # gate, one (H, D) matrix per expert
        self.w3 = nn.Parameter(torch.randn(E, H, D) * 0.02)  # up
        self.w2 = nn.Parameter(torch.randn(E, D, H) * 0.02)  # down
        S = c.n_shared_experts
        self.shared_w1 = nn.Parameter(torch.randn(S, H, D) * 0.02)  # always-on experts (S may be 0)
        self.shared_w3 = nn.Parameter(torch.randn(S, H, D) * 0.02)
        self.shared_w2 = nn.Parameter(torch.randn(S, D, H) * 0.02)
        self.register_buffer("expert_bias", torch.zeros(E))  # routing bias of "bias" balancing; stays 0 otherwise
        self.dispatch = "sorted"
        self.aux_loss = self.last_expert_idx = self.last_load = None
        self.last_dropped = 0

    def forward(self, x):
        B, T, D = x.shape
        c = self.config
        flat = x.reshape(B * T, D)                                                    # (N, D)
        bias = self.expert_bias if c.moe_balance == "bias" else None
        logits, probs, expert_idx, weight = route(flat, self.router.weight, c.n_experts_active, bias)
        token_idx = torch.arange(B * T, device=x.device).repeat_interleave(c.n_experts_active)  # (A,)
        keep = torch.ones_like(expert_idx, dtype=torch.bool)                         # (N, K)
        if c.moe_capacity_factor is not None:
            capacity = expert_capacity(B * T, c.n_experts_active, c.n_experts, c.moe_capacity_factor)
            keep = capacity_keep(expert_idx, c.n_experts, capacity)
        keep = keep.reshape(-1)
        y = DISPATCHES[self.dispatch](flat, token_idx[keep], expert_idx.reshape(-1)[keep], weight.reshape(-1)[keep],
                                      self.w1, self.w3, self.w2)
        for s in range(c.n_shared_experts):
            y = y + swiglu(flat, self.shared_w1[s], self.shared_w3[s], self.shared_w2[s])

        self.last_expert_idx = expert_idx.detach()
        self.last_load = torch.bincount(expert_idx.reshape(-1), minlength=c.n_experts)  # routed, before any drop
        self.last_dropped = int((~keep).sum())
        aux = c.moe_z_loss_coef * router_z_loss(logits)
        if c.moe_balance == "aux":
            aux = aux + c.moe_aux_loss_coef * switch_aux_loss(probs, expert_idx)
        self.aux_loss = aux
        return y.view(B, T, D)

    @torch.no_grad()
    def update_bias(self, load=None):
        """DeepSeek-V3's auxiliary-loss-free step: raise the bias of under-loaded experts, lower the others'."""
        load = (self.last_load if load is None else load).float()
        self.expert_bias += self.config.moe_bias_update_rate * torch.sign(load.mean() - load)


# ---------------------------------------------------------------------------------------------
# Model-level helpers (the model is a model.Transformer whose config has n_experts > 0)

def moe_layers(model) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def set_dispatch(model, name: str):
    if name not in DISPATCHES:
        raise ValueError(f"dispatch must be one of {sorted(DISPATCHES)}, got {name!r}")
    for layer in moe_layers(model):
        layer.dispatch = name
    return model


def track_aux_loss(model):
    """Make model.aux_loss the sum of its MoE layers' losses after each forward (model/train.py adds it)."""
    layers = moe_layers(model)
    if layers:  # a dense model keeps no aux_loss attribute at all
        model.register_forward_hook(lambda module, args, output: setattr(
            module, "aux_loss", sum(layer.aux_loss for layer in layers)))
    return model


def train_callback(step: int, model) -> dict:
    """For train.train(callback=...): apply bias balancing, log per-layer expert load and its CV."""
    layers = moe_layers(model)
    for layer in layers:
        if layer.config.moe_balance == "bias":
            layer.update_bias()
    loads = [layer.last_load.tolist() for layer in layers]
    return {"load": loads, "cv": [load_cv(load) for load in loads],
            "dropped": sum(layer.last_dropped for layer in layers)}


@contextmanager
def routing_override(model, temperature: float = 1.0, k: int | None = None, capacity_factor="unchanged"):
    """Route a trained MoE differently for a while, to see what the router's knobs do.

    temperature divides the router logits (below 1 sharpens the choice, above 1 flattens it; done by
    scaling the router weight, since logits are linear in it); k overrides n_experts_active;
    capacity_factor overrides the capacity (None = dropless). Everything is restored on exit.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    layers = moe_layers(model)
    if not layers:
        raise ValueError("routing_override needs a model with MoE layers (config.n_experts > 0)")
    changes = {}
    if k is not None:
        changes["n_experts_active"] = k
    if capacity_factor != "unchanged":
        changes["moe_capacity_factor"] = capacity_factor
    saved = [(layer.config, layer.router.weight.data) for layer in layers]
    try:
        for layer in layers:
            new = dataclasses.replace(layer.config, **changes)
            check_config(new)
            layer.config = new
            layer.router.weight.data = layer.router.weight.data / temperature
        yield model
    finally:
        for layer, (config, weight) in zip(layers, saved):
            layer.config, layer.router.weight.data = config, weight


def param_counts(model) -> dict:
    """Total parameters and those one token uses (K of E routed experts per layer)."""
    total = model.num_params()
    idle = 0
    for layer in moe_layers(model):
        c = layer.config
        per_expert = layer.w1[0].numel() + layer.w3[0].numel() + layer.w2[0].numel()
        idle += (c.n_experts - c.n_experts_active) * per_expert
    return {"total": total, "active": total - idle}
