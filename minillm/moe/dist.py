"""Expert parallelism: each process holds E/P of the experts; tokens travel to their experts and back.

    torchrun --nproc_per_node=2 -m minillm.moe.dist      # checks 2 processes == 1 process

Every rank has its own tokens and a copy of the router (and of any shared experts). One forward:
    1. route locally, sort the assignments by expert (so also by the rank that owns the expert)
    2. all_to_all #1: how many rows each rank will send to each other rank
    3. all_to_all #2: the token vectors and their expert ids go to the expert's owner
    4. the owner runs its experts on what arrived (the sorted dispatch of layer.py)
    5. all_to_all #3: the outputs go back, in the order they came; the sender weights and sums them
The backward of an all-to-all is the all-to-all with send and receive sizes swapped (AllToAll below),
so gradients flow back to the tokens' ranks and the expert weights get their gradients on their owner.

Gloo on CPU here; the same code runs on NCCL across GPUs and machines. Not handled: capacity limits
(dropless only), the auxiliary loss (compute it from the router outputs with global counts),
overlapping communication with compute.
"""
from __future__ import annotations

import socket
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn

from .layer import MoE, expert_outputs_sorted, route, swiglu


class AllToAll(torch.autograd.Function):
    """dist.all_to_all_single with autograd: rows x (A, ...) split by send_sizes -> (sum(recv_sizes), ...)."""

    @staticmethod
    def forward(ctx, x, send_sizes: list[int], recv_sizes: list[int]):
        ctx.sizes = send_sizes, recv_sizes
        out = x.new_empty(sum(recv_sizes), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_sizes, input_split_sizes=send_sizes)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        send_sizes, recv_sizes = ctx.sizes
        grad_in = grad_out.new_empty(sum(send_sizes), *grad_out.shape[1:])
        dist.all_to_all_single(grad_in, grad_out.contiguous(), output_split_sizes=send_sizes,
                               input_split_sizes=recv_sizes)
        return grad_in, None, None


class ExpertParallelMoE(nn.Module):
    """This rank's share of an moe.MoE layer: the router and shared experts, and experts lo..hi-1."""

    def __init__(self, layer: MoE, rank: int, world_size: int):
        super().__init__()
        c = layer.config
        if c.n_experts % world_size:
            raise ValueError(f"n_experts={c.n_experts} does not split evenly over world_size={world_size} ranks")
        if c.moe_capacity_factor is not None:
            raise ValueError(f"expert parallelism here is dropless; got moe_capacity_factor={c.moe_capacity_factor}")
        self.config, self.rank, self.world_size = c, rank, world_size
        self.per_rank = c.n_experts // world_size
        self.lo = rank * self.per_rank
        own = slice(self.lo, self.lo + self.per_rank)
        self.router = nn.Linear(c.dim, c.n_experts, bias=False)
        self.router.weight = nn.Parameter(layer.router.weight.detach().clone())
        self.w1, self.w3, self.w2 = (nn.Parameter(w[own].detach().clone()) for w in (layer.w1, layer.w3, layer.w2))
        self.shared = nn.ParameterList(nn.Parameter(w.detach().clone())
                                       for w in (layer.shared_w1, layer.shared_w3, layer.shared_w2))
        self.register_buffer("expert_bias", layer.expert_bias.detach().clone())

    def forward(self, x):
        B, T, D = x.shape
        c, k = self.config, self.config.n_experts_active
        flat = x.reshape(B * T, D)                                                     # (N, D) this rank's tokens
        bias = self.expert_bias if c.moe_balance == "bias" else None
        _, _, expert_idx, weight = route(flat, self.router.weight, k, bias)
        expert_idx, weight = expert_idx.reshape(-1), weight.reshape(-1)               # (A,)
        order = torch.argsort(expert_idx, stable=True)                                # grouped by expert, so by rank
        token_idx = torch.arange(B * T, device=x.device).repeat_interleave(k)[order]   # (A,)
        send_experts = expert_idx[order]
        send_sizes = torch.bincount(send_experts // self.per_rank, minlength=self.world_size)  # (P,)
        recv_sizes = torch.empty_like(send_sizes)
        dist.all_to_all_single(recv_sizes, send_sizes)                                 # 1. exchange counts
        send_sizes, recv_sizes = send_sizes.tolist(), recv_sizes.tolist()
        recv_x = AllToAll.apply(flat[token_idx], send_sizes, recv_sizes)               # 2. tokens (R, D)
        recv_experts = torch.empty(sum(recv_sizes), dtype=send_experts.dtype, device=x.device)
        dist.all_to_all_single(recv_experts, send_experts, recv_sizes, send_sizes)     #    and their experts
        out = expert_outputs_sorted(recv_x, recv_experts - self.lo, self.w1, self.w3, self.w2)  # 3. (R, D)
        back = AllToAll.apply(out, recv_sizes, send_sizes)                             # 4. home again (A, D)
        y = torch.zeros_like(flat).index_add(0, token_idx, back * weight[order, None])
        w1s, w3s, w2s = self.shared
        for s in range(c.n_shared_experts):
            y = y + swiglu(flat, w1s[s], w3s[s], w2s[s])
        return y.view(B, T, D)


def layer_config(world_size: int, n_shared_experts: int = 1) -> SimpleNamespace:
    """The layer the check runs, 4 experts per rank, top-2: the fields of the model's Config that MoE reads (so
    this module stays below the model; tests/test_moe_dist.py checks they equal tiny(...)'s)."""
    return SimpleNamespace(dim=64, hidden_dim=32, n_experts=4 * world_size, n_experts_active=2,
                           n_shared_experts=n_shared_experts, moe_balance="aux", moe_aux_loss_coef=0.01,
                           moe_z_loss_coef=0.001, moe_capacity_factor=None, moe_bias_update_rate=0.001)


def check_against_single_process(rank: int, world_size: int, n_shared_experts: int = 1) -> dict:
    """Run on every rank of an initialised group: forward and backward equal the one-process layer's.

    All ranks build the same layer and the same batch from seed 0; rank r takes batch rows r::P.
    Returns the largest differences (outputs, input grads, expert grads, router grads).
    """
    cfg = layer_config(world_size, n_shared_experts)
    torch.manual_seed(0)
    full = MoE(cfg)
    x = torch.randn(2 * world_size, 10, cfg.dim, requires_grad=True)
    grad_y = torch.randn(2 * world_size, 10, cfg.dim)
    (full(x) * grad_y).sum().backward()                                                # the one-process answer

    ep = ExpertParallelMoE(full, rank, world_size)
    x_local = x.detach()[rank::world_size].clone().requires_grad_()
    y_local = ep(x_local)
    (y_local * grad_y[rank::world_size]).sum().backward()
    router_grad = ep.router.weight.grad.clone()
    dist.all_reduce(router_grad)                                                       # replicated: sum over ranks
    own = slice(ep.lo, ep.lo + ep.per_rank)
    diffs = {"output": (y_local - full(x.detach())[rank::world_size]).abs().max().item(),
             "grad_x": (x_local.grad - x.grad[rank::world_size]).abs().max().item(),
             "grad_experts": max((mine.grad - ref.grad[own]).abs().max().item()
                                 for mine, ref in zip((ep.w1, ep.w3, ep.w2), (full.w1, full.w3, full.w2))),
             "grad_router": (router_grad - full.router.weight.grad).abs().max().item()}
    return diffs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world_size: int, port: int, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results[rank] = check_against_single_process(rank, world_size)
    finally:
        dist.destroy_process_group()


def spawn_check(world_size: int = 2) -> list[dict]:
    """Start world_size local gloo processes (loopback only) and return each rank's differences."""
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_spawned, args=(world_size, free_port(), results), nprocs=world_size, join=True)
        return [results[r] for r in range(world_size)]


if __name__ == "__main__":  # under torchrun: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT come from the launcher
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    diffs = check_against_single_process(rank, world)
    print(f"rank {rank} of {world}: experts {4 * rank}..{4 * rank + 3}, "
          f"max |difference| vs one process: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), flush=True)
    dist.destroy_process_group()
    if max(diffs.values()) > 1e-5:  # any failing rank makes torchrun exit non-zero
        raise SystemExit(f"rank {rank}: expert-parallel layer differs from the single-process layer: {diffs}")
