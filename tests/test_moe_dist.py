"""Chapter 4: expert parallelism over 2 gloo processes equals the single-process MoE layer."""
import pytest
import torch

from minillm.moe import layer as moe
from minillm.model import tiny
from minillm.moe.dist import ExpertParallelMoE, layer_config, spawn_check


def test_two_gloo_processes_match_single_process_forward_and_backward():
    results = spawn_check(world_size=2)  # spawns 2 processes on 127.0.0.1, a free port
    assert len(results) == 2
    for rank, diffs in enumerate(results):
        for name, diff in diffs.items():
            assert diff < 1e-5, f"rank {rank}: {name} differs by {diff}"


def test_experts_must_split_evenly_and_dropless_only():
    layer = moe.MoE(tiny(n_experts=3, n_experts_active=1, hidden_dim=16))
    with pytest.raises(ValueError, match="does not split evenly"):
        ExpertParallelMoE(layer, rank=0, world_size=2)
    layer = moe.MoE(tiny(n_experts=4, n_experts_active=1, hidden_dim=16, moe_capacity_factor=1.0))
    with pytest.raises(ValueError, match="dropless"):
        ExpertParallelMoE(layer, rank=0, world_size=2)


def test_shard_holds_its_slice_of_experts():
    torch.manual_seed(0)
    layer = moe.MoE(tiny(n_experts=4, n_experts_active=2, hidden_dim=16))
    shard = ExpertParallelMoE(layer, rank=1, world_size=2)
    torch.testing.assert_close(shard.w1, layer.w1[2:4])
    torch.testing.assert_close(shard.w2, layer.w2[2:4])


def test_check_layer_config_is_the_model_config_it_stands_for():
    cfg = tiny(n_experts=8, n_experts_active=2, hidden_dim=32, n_shared_experts=1)
    assert vars(layer_config(2, 1)) == {name: getattr(cfg, name) for name in vars(layer_config(2, 1))}
