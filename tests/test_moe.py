"""Chapter 4: the MoE layer, its three dispatches, losses, capacity and balancing."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.moe import layer as moe
from minillm.model import Transformer, tiny


def make_weights(E, D, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(E, H, D, generator=g) / math.sqrt(D), torch.randn(E, H, D, generator=g) / math.sqrt(D),
            torch.randn(E, D, H, generator=g) / math.sqrt(H)]


def run_dispatch(fn, x, token_idx, expert_idx, weight, ws):
    """Output and gradients (x, weight, w1, w3, w2) of one dispatch under a fixed random upstream grad."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, *ws)]
    y = fn(leaves[0], token_idx, expert_idx, leaves[1], *leaves[2:])
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    return y.detach(), [t.grad for t in leaves]


@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 40), E=st.integers(1, 9), k=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_dispatches_agree_values_and_gradients(N, E, k, seed):
    k = min(k, E)
    D, H = 12, 8  # multiples of 4: torch._grouped_mm's float32 alignment (the loop fallback is tested too)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    # route to a random subset of experts so that some experts get no tokens at all
    allowed = torch.randperm(E, generator=g)[: max(k, E // 2)]
    expert_idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(N)])  # (N, K)
    weight = torch.rand(N, k, generator=g)
    token_idx = torch.arange(N).repeat_interleave(k)
    args = (x, token_idx, expert_idx.reshape(-1), weight.reshape(-1), make_weights(E, D, H, seed))
    y_ref, grads_ref = run_dispatch(moe.dispatch_loop, *args)
    for fn in (moe.dispatch_sorted, moe.dispatch_dense,
               lambda *a: moe.dispatch_sorted(*a, matmul=moe.segment_matmul_loop)):
        y, grads = run_dispatch(fn, *args)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        for got, want in zip(grads, grads_ref):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dispatch_equals_plain_pytorch_per_token():
    """Outside reference: each token's output is the weighted sum of plain nn.Linear SwiGLU experts."""
    torch.manual_seed(0)
    E, D, H, N, k = 4, 8, 12, 5, 2
    w1, w3, w2 = make_weights(E, D, H)
    x = torch.randn(N, D)
    expert_idx, weight = torch.tensor([[0, 3], [3, 0], [1, 3], [3, 1], [0, 1]]), torch.rand(N, k)
    experts = []
    for e in range(E):
        lin1, lin3, lin2 = (torch.nn.Linear(D, H, bias=False), torch.nn.Linear(D, H, bias=False),
                            torch.nn.Linear(H, D, bias=False))
        lin1.weight.data, lin3.weight.data, lin2.weight.data = w1[e], w3[e], w2[e]
        experts.append(lambda t, a=lin1, b=lin3, c=lin2: c(torch.nn.functional.silu(a(t)) * b(t)))
    want = torch.stack([sum(weight[n, j] * experts[expert_idx[n, j]](x[n]) for j in range(k)) for n in range(N)])
    got = moe.dispatch_sorted(x, torch.arange(N).repeat_interleave(k), expert_idx.reshape(-1),
                              weight.reshape(-1), w1, w3, w2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_route_topk_renormalised_and_bias_moves_choice_only():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    router = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])  # (E=3, D=2)
    logits, probs, idx, w = moe.route(x, router, k=2)
    torch.testing.assert_close(probs, torch.softmax(x @ router.T, -1))
    assert idx[0].tolist() == [0, 1] and idx[1].tolist() == [2, 0]
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    torch.testing.assert_close(w[0], probs[0, :2] / probs[0, :2].sum())
    _, _, idx_b, w_b = moe.route(x, router, k=1, bias=torch.tensor([0.0, 0.0, 1.0]))
    assert idx_b[:, 0].tolist() == [2, 2]                  # the bias changed token 0's choice...
    torch.testing.assert_close(w_b[:, 0], probs[:, 2])     # ...but the weight is the unbiased probability


def test_switch_aux_loss_hand_computed():
    # 4 tokens, E=2, top-1. Choices [0, 0, 0, 1] -> f = [3/4, 1/4]; P = column means of probs.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    idx = probs.argmax(-1, keepdim=True)
    # P = [2.6/4, 1.4/4] = [0.65, 0.35]; loss = 2 * (0.75*0.65 + 0.25*0.35) = 2 * 0.575 = 1.15
    assert moe.switch_aux_loss(probs, idx).item() == pytest.approx(1.15)
    uniform = torch.full((4, 2), 0.5)
    assert moe.switch_aux_loss(uniform, torch.tensor([[0], [1], [0], [1]])).item() == pytest.approx(1.0)


def test_router_z_loss_formula():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    want = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    assert moe.router_z_loss(logits).item() == pytest.approx(want, rel=1e-6)


def test_capacity_drops_exactly_the_tokens_over_capacity_in_documented_order():
    # E=2, K=2, 4 tokens. First choices in token order: e0, e0, e1, e0; then second choices: e1, e1, e0, e1.
    idx = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    assert moe.expert_capacity(4, 2, 2, 1.0) == 4
    keep = moe.capacity_keep(idx, n_experts=2, capacity=3)
    # e0 arrivals: t0c0, t1c0, t3c0 (first choices), then t2c1 -> the 4th is dropped.
    # e1 arrivals: t2c0, then t0c1, t1c1, t3c1 -> t3's second choice is the 4th and dropped.
    assert keep.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    assert moe.capacity_keep(idx, 2, capacity=8).all()


@settings(max_examples=20, deadline=None)
@given(N=st.integers(1, 30), E=st.integers(1, 6), cap=st.integers(0, 12), seed=st.integers(0, 1000))
def test_capacity_keeps_min_of_load_and_capacity(N, E, cap, seed):
    idx = torch.randint(E, (N, 1), generator=torch.Generator().manual_seed(seed))
    keep = moe.capacity_keep(idx, E, cap)
    for e in range(E):
        mine = (idx[:, 0] == e).nonzero().squeeze(1)
        assert keep[mine, 0].tolist() == [i < cap for i in range(len(mine))]  # earliest tokens kept


def test_layer_with_capacity_drops_and_dropped_tokens_get_only_the_shared_path():
    cfg = tiny(n_experts=2, n_experts_active=1, hidden_dim=16, moe_capacity_factor=0.5)
    torch.manual_seed(0)
    layer = moe.MoE(cfg)
    x = torch.randn(1, 8, cfg.dim)
    y = layer(x)
    idx = layer.last_expert_idx
    keep = moe.capacity_keep(idx, 2, moe.expert_capacity(8, 1, 2, 0.5))
    assert layer.last_dropped == int((~keep).sum()) > 0
    assert torch.all(y[0][~keep[:, 0]] == 0)  # no shared expert here: a dropped token's MoE output is zero


def model_pair(**changes):
    cfg = tiny(**{"n_experts": 4, "n_experts_active": 2, "hidden_dim": 32, **changes})
    torch.manual_seed(0)
    return Transformer(cfg), torch.randint(0, cfg.vocab_size, (2, 12))


@pytest.mark.parametrize("changes", [{}, {"n_shared_experts": 1}, {"n_experts_active": 1},
                                     {"moe_balance": "bias"}, {"moe_capacity_factor": 1.0}])
def test_model_dispatches_agree(changes):
    model, ids = model_pair(**changes)
    outs = {name: moe.set_dispatch(model, name)(ids) for name in moe.DISPATCHES}
    torch.testing.assert_close(outs["sorted"], outs["loop"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["dense"], outs["loop"], atol=1e-5, rtol=1e-5)


def test_aux_loss_reaches_the_model_and_the_router():
    model, ids = model_pair()
    moe.track_aux_loss(model)
    model(ids)
    assert model.aux_loss.item() > 0
    model.aux_loss.backward()
    assert model.layers[0].ffn.router.weight.grad.abs().sum() > 0
    dense = moe.track_aux_loss(Transformer(tiny()))
    dense(ids)
    assert not hasattr(dense, "aux_loss")


def test_bias_balancing_step_and_callback():
    model, ids = model_pair(moe_balance="bias", moe_bias_update_rate=0.1)
    model(ids)
    layer = model.layers[0].ffn
    load = layer.last_load.clone()
    info = moe.train_callback(0, model)
    assert info["load"][0] == load.tolist() and info["cv"][0] == pytest.approx(moe.load_cv(load))
    want = 0.1 * torch.sign(load.float().mean() - load.float())
    torch.testing.assert_close(layer.expert_bias, want)


def test_load_cv():
    assert moe.load_cv([5, 5, 5, 5]) == 0
    assert moe.load_cv([8, 0, 0, 0]) == pytest.approx(math.sqrt(3))


def test_param_counts_equal_active_params_to_dense():
    moe_model = Transformer(tiny(vocab_size=256, n_experts=8, n_experts_active=2, hidden_dim=80))
    dense = Transformer(tiny(vocab_size=256))
    counts = moe.param_counts(moe_model)
    router_params = 2 * 8 * 64
    assert counts["active"] == dense.num_params() + router_params
    assert counts["total"] == counts["active"] + 2 * 6 * 3 * 64 * 80


def test_dense_config_builds_the_dense_feed_forward():
    from minillm.model import FeedForward
    assert isinstance(Transformer(tiny()).layers[0].ffn, FeedForward)


@pytest.mark.parametrize("changes, needle", [({"n_experts_active": 5}, "n_experts_active"),
                                             ({"moe_balance": "magic"}, "moe_balance"),
                                             ({"moe_capacity_factor": 0.0}, "moe_capacity_factor"),
                                             ({"n_shared_experts": -1}, "n_shared_experts")])
def test_bad_config_errors(changes, needle):
    with pytest.raises(ValueError, match=needle):
        Transformer(tiny(n_experts=4, **changes))


def test_bad_dispatch_name():
    model, _ = model_pair()
    with pytest.raises(ValueError, match="dispatch must be one of"):
        moe.set_dispatch(model, "fast")


@pytest.mark.slow
def test_layer_and_aux_loss_match_hf_mixtral():
    """Outside reference: HF transformers' MixtralSparseMoeBlock (top-k, renormalised, SwiGLU experts)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

    cfg = tiny(n_experts=4, n_experts_active=2, hidden_dim=32)
    torch.manual_seed(0)
    ours = moe.MoE(cfg)
    hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                                             num_local_experts=4, num_experts_per_tok=2)).eval()
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.weight)
        hf.experts.gate_up_proj.copy_(torch.cat([ours.w1, ours.w3], dim=1))  # (E, 2H, D): gate rows, then up
        hf.experts.down_proj.copy_(ours.w2)
    x = torch.randn(2, 9, cfg.dim)
    for name in moe.DISPATCHES:
        ours.dispatch = name
        torch.testing.assert_close(ours(x), hf(x), atol=1e-6, rtol=1e-5)
    logits = ours.router(x.reshape(-1, cfg.dim))
    hf_aux = load_balancing_loss_func((logits,), num_experts=4, top_k=2)
    # HF divides expert counts by N, Switch's f_i divides by N*K: HF's value is K times ours
    ours_aux = moe.switch_aux_loss(torch.softmax(logits, -1), ours.last_expert_idx)
    torch.testing.assert_close(hf_aux, 2 * ours_aux)


def test_train_loop_adds_aux_loss_and_logs_load():
    from minillm.model.train import TrainConfig, train
    torch.manual_seed(0)
    model = moe.track_aux_loss(Transformer(tiny(vocab_size=256, n_experts=4, hidden_dim=32)))
    data = torch.randint(0, 256, (2000,))
    history = train(model, data, data, TrainConfig(steps=3, batch_size=2, seq_len=16, warmup=1, eval_steps=1),
                    progress=False, callback=moe.train_callback)
    assert len(history["aux_loss"]) == 3 and all(a > 0 for a in history["aux_loss"])
    assert [sum(load) for load in history["metrics"][-1]["load"]] == [2 * 16 * 2] * 2  # B*T*K per layer


def test_routing_override_matches_a_model_built_that_way_and_restores():
    """Temperature, k and capacity changed for a while equal a model configured so from the start
    (temperature by its router weights scaled), and everything comes back on exit."""
    model, ids = model_pair()
    before = model(ids)
    router = model.layers[0].ffn.router.weight.clone()
    other, _ = model_pair(n_experts_active=1, moe_capacity_factor=1.0)
    other.load_state_dict(model.state_dict())
    for layer in moe.moe_layers(other):
        layer.router.weight.data /= 0.5
    with moe.routing_override(model, temperature=0.5, k=1, capacity_factor=1.0):
        torch.testing.assert_close(model(ids), other(ids))
        assert model.layers[0].ffn.last_dropped == other.layers[0].ffn.last_dropped
    torch.testing.assert_close(model(ids), before)
    assert torch.equal(model.layers[0].ffn.router.weight, router)
    assert model.layers[0].ffn.config.n_experts_active == 2


@pytest.mark.parametrize("kwargs, needle", [({"temperature": 0.0}, "temperature"), ({"k": 9}, "n_experts_active"),
                                            ({"capacity_factor": -1.0}, "moe_capacity_factor")])
def test_routing_override_bad_values_restore(kwargs, needle):
    model, ids = model_pair()
    before = model(ids)
    with pytest.raises(ValueError, match=needle):
        with moe.routing_override(model, **kwargs):
            pass
    torch.testing.assert_close(model(ids), before)


def test_bench_moe_names_the_cpu_above_its_figures(capsys):
    from minillm.bench.moe import bench_dispatch
    from minillm.timing import machine_line

    rows = bench_dispatch(tokens=(8,), experts=(2,), dim=16, hidden=16, repeats=1)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == machine_line() and out[1].startswith("T=    8 E=  2")
    assert rows[0]["loop_vs_loop"] == 1.0 and rows[0]["dense_ms"] > 0
