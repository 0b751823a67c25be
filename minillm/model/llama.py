"""A Llama-architecture decoder, read top to bottom: norm, RoPE, attention, MLP, block, model.

This is the architecture of SmolLM2-135M (and of Llama 2/3, Mistral, Qwen2 without biases):
RMSNorm before each sub-layer, rotary position embeddings, grouped-query attention,
a SwiGLU feed-forward, and optionally the output head tied to the token embedding.

The forward pass takes explicit position ids and an optional boolean attention mask, so that
later chapters extend it instead of rewriting it: the KV cache (chapter 2) passes a cache
object, tree attention (chapter 6) passes a tree mask and depth positions.

Not handled here: RoPE scaling variants (Llama-3.1 "llama3" scaling, YaRN), attention or
MLP biases, sliding-window attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..moe.layer import MoE  # a building block of the model: moe/layer.py imports nothing from this file


@dataclass
class Config:
    vocab_size: int = 49152
    dim: int = 576                # width of the residual stream
    n_layers: int = 30
    n_heads: int = 9              # query heads
    n_kv_heads: int = 3           # key/value heads; each serves n_heads // n_kv_heads query heads (GQA)
    hidden_dim: int = 1536        # inner width of the SwiGLU feed-forward
    max_seq_len: int = 8192       # context length the model was trained for
    rope_theta: float = 100000.0  # RoPE base; larger bases rotate slower, for longer contexts
    norm_eps: float = 1e-5
    tie_embeddings: bool = True   # the output head reuses the token embedding matrix
    eos_token_id: int | None = 2  # generation stops here; None never stops early
    # Mixture of experts (chapter 4, moe/layer.py). n_experts=0 keeps the dense SwiGLU feed-forward.
    n_experts: int = 0             # routed experts per layer, each a SwiGLU of width hidden_dim
    n_experts_active: int = 2      # top-k experts each token is sent to
    n_shared_experts: int = 0      # always-on experts every token also passes through (DeepSeekMoE)
    moe_balance: str = "aux"       # "aux" (Switch loss), "bias" (aux-loss-free, DeepSeek-V3) or "none"
    moe_aux_loss_coef: float = 0.01
    moe_z_loss_coef: float = 0.001     # router z-loss (ST-MoE): keeps router logits small
    moe_capacity_factor: float | None = None  # None = dropless; else each expert takes at most cf*T*k/E tokens
    moe_bias_update_rate: float = 0.001       # step of the "bias" balancing update per training step

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    # Bounds a config read from a file must respect before anything is allocated for it
    LIMITS = {"vocab_size": 1 << 20, "dim": 1 << 15, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
              "hidden_dim": 1 << 17, "max_seq_len": 1 << 20, "n_experts": 1024, "n_experts_active": 1024,
              "n_shared_experts": 64}

    def __post_init__(self):
        for name, most in self.LIMITS.items():
            value, least = getattr(self, name), 0 if name in ("n_experts", "n_shared_experts") else 1
            if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
                raise ValueError(f"config {name} must be an int in [{least}, {most}], got {value!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"config {name} must be a finite number > 0, got {value!r}")
        if self.eos_token_id is not None and (isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int)
                                              or not 0 <= self.eos_token_id < self.vocab_size):
            raise ValueError(f"config eos_token_id must be None or a token id below {self.vocab_size}, "
                             f"got {self.eos_token_id!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    def with_(self, **changes) -> Config:
        return replace(self, **changes)


def tiny(**changes) -> Config:
    """A model small enough for unit tests and for training on a CPU in minutes."""
    base = Config(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
                  max_seq_len=256, rope_theta=10000.0, eos_token_id=None)
    return replace(base, **changes)


def tiny_moe_presets() -> dict:
    """Byte-level MoE presets for `python -m minillm train --config NAME`: 8 experts of hidden 80, top-2,
    the same active parameters per token as tiny(vocab_size=256) (hidden 160), with each balancing scheme."""
    moe = dict(vocab_size=256, n_experts=8, n_experts_active=2, hidden_dim=80)
    return {"tiny-moe": tiny(**moe, moe_balance="aux"),
            "tiny-moe-none": tiny(**moe, moe_balance="none", moe_z_loss_coef=0.0),
            "tiny-moe-bias": tiny(**moe, moe_balance="bias", moe_bias_update_rate=0.01)}


def smollm2_135m(**changes) -> Config:
    """SmolLM2-135M(-Instruct): 30 layers, 9 query heads sharing 3 KV heads, 49,152-token vocabulary."""
    return replace(Config(), **changes)


class RMSNorm(nn.Module):
    """x / rms(x) * weight. Computed in float32 whatever the input dtype, as Llama does."""

    norm_fn = None  # a fused kernel (x, weight, eps) -> normed x (chapter 7 sets it); None: the code below

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if self.norm_fn is not None:
            return self.norm_fn(x, self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float):
    """cos and sin of the rotation angles for each position: (B, T) -> two (B, 1, T, head_dim) tensors.

    Pair i of a head is rotated by position * theta^(-2i/head_dim). Pairs are (i, i + head_dim/2),
    the "rotate half" layout of HF Llama (GGUF files store q/k rows interleaved instead; the
    loader undoes that permutation).
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq        # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]    # (B, 1, T, head_dim)
    return angles.cos(), angles.sin()


def rope_table(length: int, head_dim: int, theta: float, device="cpu"):
    """rope_cos_sin of every position below `length`, as two (length, head_dim) tables: row p is position p's,
    bit for bit (compiled and native steps index it instead of computing cos and sin each step)."""
    cos, sin = rope_cos_sin(torch.arange(length, device=device)[None], head_dim, theta)
    return cos[0, 0], sin[0, 0]


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+d/2}) pair of x (B, h, T, d) by its angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def attention_ref(q, k, v, mask):
    """The textbook version: softmax(q k^T / sqrt(d) masked) v. q (B, h, T, d), k/v (B, h, S, d), mask (B, 1, T, S) bool."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, h, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def attention_grouped(q, k, v, mask):
    """attention_ref for grouped-query attention without copying k and v per query head: k/v (B, nkv, S, d) as
    cached, the nh // nkv query heads sharing a kv head stacked as rows of one matmul. Same math as
    attention_ref on repeated k/v; inside a compiled graph the repeat was a copy of the whole cache slice per
    layer and per step (the compiled 8-row step went from 26.6 to 23.9 ms, bfloat16, AVX512, 2 threads)."""
    B, nh, T, d = q.shape
    nkv, S = k.shape[1], k.shape[2]
    g = nh // nkv
    scores = (q.reshape(B, nkv, g * T, d) @ k.transpose(-2, -1)) / math.sqrt(d)          # (B, nkv, g*T, S)
    scores = scores.view(B, nkv, g, T, S).masked_fill(~mask[:, :, None], float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(B, nkv, g * T, S)
    return (weights @ v).view(B, nh, T, d)


attention_grouped.grouped = True  # Attention.forward hands it k and v with their nkv heads, not repeated


def attention_sdpa(q, k, v, mask):
    """PyTorch's fused kernel; same result as attention_ref."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        hd = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * hd, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(config.n_heads * hd, config.dim, bias=False)
        self.wqkv = None               # wq, wk, wv stacked into one matmul (backends/fuse.py); None: three apart
        self.attn_fn = attention_sdpa  # swapped for attention_ref or a Triton kernel by callers

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        c = self.config
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            kv = c.n_kv_heads * c.head_dim
            q, k, v = self.wqkv(x).split([c.n_heads * c.head_dim, kv, kv], dim=-1)
        q = q.view(B, T, c.n_heads, c.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = k.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                         # (B, nkv, S, hd)
        if not getattr(self.attn_fn, "grouped", False):
            groups = c.n_heads // c.n_kv_heads
            k = k.repeat_interleave(groups, dim=1)                            # (B, nh, S, hd)
            v = v.repeat_interleave(groups, dim=1)
        y = self.attn_fn(q, k, v, mask)                                       # (B, nh, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, c.n_heads * c.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: Config):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)  # down
        self.w13 = None  # w1 and w3 stacked into one matmul (backends/fuse.py); None: two apart

    def forward(self, x):
        if self.w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: Config, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = MoE(config) if config.n_experts else FeedForward(config)  # MoE: chapter 4, moe/layer.py

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, positions=None, mask=None, cache=None, return_hidden=False, logits_at=None):
        """idx (B, T) token ids -> logits (B, T, vocab).

        positions (B, T): position ids for RoPE; default: continue after what the cache holds.
        mask (B or 1, 1, T, S) bool, True where a query may attend a key; default: causal by
            position over every key in view (the cache's and these T).
        cache: an object with `length`, `begin(positions)` -> key positions (B, S) and
            `update(layer_idx, k, v)` -> all keys and values in view (see cache/kv_cache.py).
        return_hidden: also return the final normed hidden states (B, T, dim), for heads
            that read them (Medusa, early exit).
        logits_at (n,) token indices along T: compute the head only there -> logits (B, n, vocab)
            (serving needs each request's last token only; the head is the largest matmul).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
        key_positions = cache.begin(positions) if cache is not None else positions  # (B, S)
        if mask is None:
            mask = key_positions[:, None, None, :] <= positions[:, None, :, None]   # (B, 1, T, S)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        x = self.tok_embeddings(idx)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        h = self.norm(x)
        logits = self.output(h if logits_at is None else h[:, logits_at])  # (B, T or n, vocab)
        return (logits, h) if return_hidden else logits

    def set_attention(self, impl: str):
        """Choose the attention implementation: "sdpa" (fast) or "ref" (plain masked softmax)."""
        fns = {"sdpa": attention_sdpa, "ref": attention_ref}
        if impl not in fns:
            raise ValueError(f"attention impl must be one of {sorted(fns)}, got {impl!r}")
        for layer in self.layers:
            layer.attn.attn_fn = fns[impl]
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once
