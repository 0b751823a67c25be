"""Chapter 4: mixture of experts.

- `layer.py`: routing, the three dispatches (loop = the reference, sorted segments, dense), load-balancing losses
  and the `MoE` layer the model's `Config` can ask for; it imports nothing above it, so the model may use it;
- `dist.py` (imported on its own: it needs torch.distributed): expert parallelism across processes.
"""
from .layer import (
                    BALANCE_MODES,
                    DISPATCHES,
                    MoE,
                    capacity_keep,
                    check_config,
                    dispatch_dense,
                    dispatch_loop,
                    dispatch_sorted,
                    expert_capacity,
                    expert_outputs_sorted,
                    load_cv,
                    moe_layers,
                    param_counts,
                    route,
                    router_z_loss,
                    routing_override,
                    segment_matmul,
                    segment_matmul_loop,
                    set_dispatch,
                    swiglu,
                    switch_aux_loss,
                    track_aux_loss,
                    train_callback,
)

__all__ = ["BALANCE_MODES", "DISPATCHES", "MoE", "capacity_keep", "check_config", "dispatch_dense", "dispatch_loop",
           "dispatch_sorted", "expert_capacity", "expert_outputs_sorted", "load_cv", "moe_layers", "param_counts",
           "route", "router_z_loss", "routing_override", "segment_matmul", "segment_matmul_loop", "set_dispatch",
           "swiglu", "switch_aux_loss", "track_aux_loss", "train_callback"]
