"""AWQ: scale up the weight columns that meet large activations before rounding, and fold the inverse scale away.

"AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration" (Lin et al., 2023).
Observation: a small fraction of input channels carry large activations, and rounding errors in
their weight columns cost the most. Multiplying column k of W by s_k > 1 (and the input channel by
1 / s_k) leaves the layer's float output unchanged, but makes that column's relative rounding error
smaller (the group's scale grows less than the column does). AWQ searches

    s = mean|x|^alpha,  alpha in {0, 1/20, ..., 19/20},   normalised so that sqrt(max(s) min(s)) = 1

and keeps the alpha whose quantized layer output is closest to the float output on calibration
data. 1 / s is folded into the operation that produces the input, so no extra work is done at
run time:
    q, k, v  <- attn_norm.weight / s      (their shared input is an RMSNorm output)
    w1, w3   <- ffn_norm.weight / s
    w2       <- w3's rows / s             (w2's input is silu(w1 x) * (w3 x), linear in w3)
    wo       is left alone: with grouped-query attention its input channels are not v's rows one
             to one (the paper's code skips it for GQA models too).
Then every Linear is rounded to nearest (formats.py's group-wise int4).

Simplifications against the paper's code (llm-awq), stated plainly: the search objective is the
output of the Linears sharing an input (not the whole attention block), and the weight-clipping
search (auto_clip) is not done, and the search runs on a random sample of 256 calibration tokens per
block (to fit a shared 2-core CPU). alpha = 0 gives s = 1, i.e. plain RTN: a test asserts it.
"""
from __future__ import annotations

import torch

from .calibration import block_inputs, check_calibration, collect_inputs
from .formats import Int4Linear, fake_quantize, replace_linears


def search_scale(weights, x, group_size: int = 128, symmetric: bool = True, grid: int = 20):
    """weights: Linears' weights (N_i, K) sharing input x (tokens, K) -> (best s (K,), best alpha, errors per alpha)."""
    W = torch.cat(weights)                                                      # (sum N_i, K)
    reference = x @ W.T                                                         # (tokens, sum N_i)
    act = x.abs().mean(0)                                                       # (K,)
    best, errors = (None, None, float("inf")), []
    for step in range(grid):
        alpha = step / grid
        s = act.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        W_q = fake_quantize(W * s, 4, group_size, symmetric) / s
        err = (x @ W_q.T - reference).pow(2).mean().item()
        errors.append(err)
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], errors


@torch.no_grad()
def awq_scale_block(block, x, cos, sin, mask, group_size: int = 128, symmetric: bool = True, tokens: int = 256):
    """Search and apply the three AWQ scalings of one block (float output unchanged); returns their alphas."""
    inputs, _ = collect_inputs(block, x, cos, sin, mask)
    pick = torch.randperm(inputs["attn.wq"].shape[0], generator=torch.Generator().manual_seed(0))[:tokens]
    attn, ffn, alphas = block.attn, block.ffn, {}

    s, alphas["qkv"], _ = search_scale([attn.wq.weight, attn.wk.weight, attn.wv.weight], inputs["attn.wq"][pick],
                                       group_size, symmetric)
    block.attn_norm.weight.div_(s)
    for lin in (attn.wq, attn.wk, attn.wv):
        lin.weight.mul_(s)

    s, alphas["gate_up"], _ = search_scale([ffn.w1.weight, ffn.w3.weight], inputs["ffn.w1"][pick], group_size, symmetric)
    block.ffn_norm.weight.div_(s)
    for lin in (ffn.w1, ffn.w3):
        lin.weight.mul_(s)

    s, alphas["down"], _ = search_scale([ffn.w2.weight], inputs["ffn.w2"][pick], group_size, symmetric)
    ffn.w3.weight.div_(s[:, None])
    ffn.w2.weight.mul_(s)
    return alphas


@torch.no_grad()
def awq_quantize_model(model, calibration, group_size: int = 128, symmetric: bool = True, tokens: int = 256,
                       progress=None):
    """Scale every block on float activations (as the paper does), then round every Linear to int4."""
    ids = check_calibration(model, calibration)
    x, cos, sin, mask = block_inputs(model, ids)
    model.awq_alphas = []
    for li, block in enumerate(model.layers):
        model.awq_alphas.append(awq_scale_block(block, x, cos, sin, mask, group_size, symmetric, tokens))
        x = torch.cat([block(x[i:i + 4], cos[i:i + 4], sin[i:i + 4], mask[i:i + 4]) for i in range(0, x.shape[0], 4)])
        if progress:
            progress(li)
    return replace_linears(model, lambda name, lin: Int4Linear.from_linear(lin, group_size, symmetric))
