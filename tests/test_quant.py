"""Chapter 3: group-wise RTN, int4 packing, quantized Linears, GPTQ, AWQ, perplexity."""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm
from minillm.assets import ASSETS
from minillm.quant.awq import awq_scale_block, search_scale
from minillm.quant.gptq import block_inputs, gptq_quantize, gptq_quantize_ref
from minillm.model import Transformer, tiny
from minillm.model.perplexity import nll_sum
from minillm.quant.formats import KERNEL_CHOICES
from minillm.quant import (Int4Linear, Int8Linear, dequantize_groups, fake_quantize, kernels_used, model_bytes,
                           pack_int4, quantize, quantize_groups, quantize_groups_ref, set_impl, unpack_int4)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 4), group_size=st.sampled_from([2, 4, 8, 32]),
       bits=st.sampled_from([4, 8]), symmetric=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_rtn_matches_loops_and_error_is_half_a_step(rows, groups, group_size, bits, symmetric, seed):
    w = torch.randn(rows, groups * group_size, generator=torch.Generator().manual_seed(seed))
    q, scales, offsets = quantize_groups(w, bits, group_size, symmetric)
    q_ref, scales_ref, offsets_ref = quantize_groups_ref(w, bits, group_size, symmetric)
    assert torch.equal(q, q_ref)
    torch.testing.assert_close(scales, scales_ref)
    torch.testing.assert_close(offsets, offsets_ref)
    assert int(q.max()) <= 2 ** bits - 1
    err = (dequantize_groups(q, scales, offsets) - w).abs().reshape(rows, groups, group_size)
    # half a step, plus what rounding the offset (the group min) to float16 can add at the top of the range
    bound = scales / 2 + offsets.abs() * 2 ** -10 + 1e-6
    assert (err <= bound[..., None]).all()


def test_group_size_must_divide_width():
    with pytest.raises(ValueError, match="576 is not a multiple of group_size 128"):
        quantize_groups(torch.randn(4, 576), 4, 128)
    with pytest.raises(ValueError, match="2-D weight"):
        quantize_groups(torch.randn(4), 4, 2)
    with pytest.raises(ValueError, match="group_size must divide"):
        Int4Linear.from_linear(torch.nn.Linear(576, 8, bias=False), group_size=128)


def test_pack_int4_layout_and_round_trip():
    assert pack_int4(torch.tensor([[1, 2, 3, 4]])).tolist() == [[0x21, 0x43]]  # column 2j low, 2j+1 high
    q = torch.randint(0, 16, (7, 30), dtype=torch.uint8)
    assert pack_int4(q).shape == (7, 15)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    with pytest.raises(ValueError, match="even number of columns"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([[0, 16]]))


def assert_bf16_close(y, ref, x, w):
    """Activations (and int8 scales) rounded to bfloat16 lose up to 2**-9 of each value and the output
    another 2**-9: the error is at most 2**-7 of sum_k |x_k| |w_nk|, the magnitude the sum was made of."""
    bound = 2 ** -7 * (x.abs() @ w.abs().T) + 1e-5
    assert ((y.float() - ref).abs() <= bound).all(), float(((y.float() - ref).abs() / bound).max())


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_linear_packed_equals_reference(symmetric):
    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 97, bias=False)  # an odd number of rows
    m = Int4Linear.from_linear(linear, group_size=32, symmetric=symmetric, impl="ref")
    x = torch.randn(3, 5, 192)
    ref = m.forward_ref(x)
    torch.testing.assert_close(ref, x @ m.dequantize().T)
    torch.testing.assert_close(m.dequantize(), fake_quantize(linear.weight.detach(), 4, 32, symmetric))
    assert m.impl == "ref" and torch.equal(m(x), ref)
    m.set_impl("packed", torch.float32)
    torch.testing.assert_close(m(x), ref, atol=1e-4, rtol=1e-4)
    m.set_impl("packed")                             # bfloat16 activations: the vectorized kernel
    assert m.act_dtype == torch.bfloat16 and "kernel=packed/bfloat16" in repr(m)
    assert_bf16_close(m(x), ref, x, m.dequantize())
    assert m(x.bfloat16()).dtype == torch.bfloat16   # a bfloat16 model gets bfloat16 back


def test_auto_measures_each_kernel_and_keeps_the_fastest():
    torch.manual_seed(0)
    m = Int4Linear.from_linear(torch.nn.Linear(128, 48, bias=False), group_size=64)  # impl="auto" by default
    key = ("Int4Linear", 48, 128, 64, torch.get_num_threads())
    impl, act, times = KERNEL_CHOICES[key]
    assert set(times) == {"ref/float32", "packed/bfloat16", "packed/float32"}
    assert (m.impl, m.act_dtype) == (impl, act) and f"{impl}/{str(act)[6:]}" == min(times, key=times.get)
    assert kernels_used(torch.nn.Sequential(m)) == {m.kernel(): 1}
    odd = Int4Linear.from_linear(torch.nn.Linear(96, 16, bias=False), group_size=16)  # no packed kernel for g16
    assert odd.impl == "ref"
    with pytest.raises(ValueError, match="packed int4 kernel takes group sizes .* not 16"):
        odd.set_impl("packed")
    with pytest.raises(ValueError, match="act_dtype must be"):
        m.set_impl("packed", torch.float16)


def test_bfloat16_cast_keeps_the_quantized_buffers_exact():
    m = Int4Linear.from_linear(torch.nn.Linear(64, 32, bias=False), group_size=32, impl="ref")
    scales = m.scales.clone()
    m.bfloat16()
    assert m.scales.dtype == torch.float16 and torch.equal(m.scales, scales)


def test_int8_linear_packed_equals_reference_and_is_close():
    torch.manual_seed(0)
    linear = torch.nn.Linear(160, 64, bias=False)
    m = Int8Linear.from_linear(linear)
    x = torch.randn(4, 160)
    m.set_impl("packed", torch.float32)
    torch.testing.assert_close(m(x), m.forward_ref(x), atol=1e-4, rtol=1e-4)
    m.set_impl("packed", torch.bfloat16)
    assert_bf16_close(m(x), m.forward_ref(x), x, m.dequantize())
    step = linear.weight.abs().amax(1) / 127
    assert ((m.dequantize() - linear.weight).abs() <= step[:, None] / 2 + 1e-6).all()


def test_int8_linear_takes_a_weight_that_is_not_64_byte_aligned():
    """A safetensors file read in place gives 8-byte-aligned tensors; the packed kernel's AVX-512 path crashed the
    process on them (segmentation fault, torch 2.13). The module keeps an aligned copy of its own."""
    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (576, 576), dtype=torch.int8)
    storage = torch.empty(weight.numel() + 8, dtype=torch.int8)
    misaligned = storage[8:].view(576, 576)
    misaligned.copy_(weight)
    assert misaligned.data_ptr() % 64 == 8
    m = Int8Linear(misaligned, torch.rand(576) / 100, impl="packed", act_dtype=torch.bfloat16)
    assert m.weight.data_ptr() % 64 == 0 and torch.equal(m.weight, weight)
    x = torch.randn(6, 576)
    assert_bf16_close(m(x), m.forward_ref(x), x, m.dequantize())
    aligned = weight.clone()
    assert Int8Linear(aligned, torch.rand(576), impl="ref").weight.data_ptr() == aligned.data_ptr()  # no copy needed


def correlated_inputs(n=1024, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)


def test_gptq_lazy_batches_equal_the_textbook_loop():
    X = correlated_inputs()
    H = 2 * X.T @ X / len(X)
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = gptq_quantize_ref(W, H, 4, 32)
    for block_size in (16, 32, 128):
        fast = gptq_quantize(W, H, 4, 32, block_size=block_size)
        assert torch.equal(fast[0], ref[0])
        torch.testing.assert_close(fast[1], ref[1])


def test_gptq_with_identity_hessian_is_rtn():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    q, scales, offsets = gptq_quantize(W, torch.eye(64, dtype=torch.float64), 4, 32, damp=0.0)
    assert torch.equal(dequantize_groups(q, scales, offsets), fake_quantize(W, 4, 32, True))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_output_error(act_order):
    X = correlated_inputs()
    H = 2 * X.T @ X / len(X)
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    q, scales, offsets = gptq_quantize(W, H, 4, 32, act_order=act_order)
    gptq_err = (X @ (dequantize_groups(q, scales, offsets) - W).T).pow(2).mean()
    rtn_err = (X @ (fake_quantize(W, 4, 32, True) - W).T).pow(2).mean()
    assert gptq_err < 0.7 * rtn_err


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Transformer(tiny()).eval()


def test_awq_alpha_zero_is_rtn_and_scaling_keeps_the_float_block(tiny_model):
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    s, alpha, _ = search_scale([tiny_model.layers[0].ffn.w1.weight], x, group_size=32, grid=1)
    assert alpha == 0 and torch.allclose(s, torch.ones(64))
    block = copy.deepcopy(tiny_model.layers[0])
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    h, cos, sin, mask = block_inputs(tiny_model, ids)
    before = block(h, cos, sin, mask)
    with torch.no_grad():
        awq_scale_block(block, h, cos, sin, mask, group_size=32)
    torch.testing.assert_close(block(h, cos, sin, mask), before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["int8", "int4", "gptq", "awq"])
def test_quantize_handler_swaps_every_transformer_linear(tiny_model, method):
    calib = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    q = quantize(copy.deepcopy(tiny_model), method, group_size=32, calibration=calib)
    linears = [n for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears == ["output"]  # the tied head stays float
    assert model_bytes(q) < model_bytes(tiny_model)
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(1))
    ref = F.softmax(tiny_model(ids), -1)
    out = F.softmax(q(ids), -1)
    assert (out - ref).abs().max() < 0.02  # a random tiny model: a loose bound, real quality is measured on SmolLM2
    set_impl(q, "packed", torch.float32)
    torch.testing.assert_close(F.softmax(q(ids), -1), out, atol=1e-5, rtol=1e-4)
    set_impl(q, "ref")
    torch.testing.assert_close(F.softmax(q(ids), -1), out, atol=1e-5, rtol=1e-4)


def test_quantized_head(tiny_model):
    q = quantize(copy.deepcopy(tiny_model), "int8", head="int8")
    assert isinstance(q.output, Int8Linear) and isinstance(q.tok_embeddings, torch.nn.Embedding)
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(1))
    assert (F.softmax(q(ids), -1) - F.softmax(tiny_model(ids), -1)).abs().max() < 0.02
    with pytest.raises(ValueError, match="head must be None"):
        quantize(copy.deepcopy(tiny_model), "int8", head="int4")


def test_quantize_bad_input(tiny_model):
    with pytest.raises(ValueError, match="method must be one of"):
        quantize(tiny_model, "int3")
    with pytest.raises(ValueError, match="needs calibration"):
        quantize(copy.deepcopy(tiny_model), "gptq", group_size=32)
    with pytest.raises(ValueError, match="integer token ids"):
        quantize(copy.deepcopy(tiny_model), "awq", group_size=32, calibration=torch.randn(2, 8))
    with pytest.raises(ValueError, match="impl must be"):
        set_impl(tiny_model, "fast")


def test_nll_sum_equals_a_position_by_position_loop(tiny_model):
    ids = torch.randint(0, 512, (21,), generator=torch.Generator().manual_seed(2))
    total, count = nll_sum(tiny_model, ids, context=8)
    expected, n = 0.0, 0
    for start in range(0, 21, 8):
        window = ids[start:start + 8]
        for t in range(1, len(window)):
            logits = tiny_model(window[None, :t])[0, -1]
            expected -= torch.log_softmax(logits, -1)[window[t]].item()
            n += 1
    assert count == n == 18
    assert math.isclose(total, expected, rel_tol=1e-5)
    with pytest.raises(ValueError, match="1-D"):
        nll_sum(tiny_model, ids[None], context=8)


# ----- the real model -----

@pytest.mark.slow
def test_asymmetric_int4_g32_reproduces_the_gguf_weights_exactly():
    from minillm.model.loading import read_gguf, tensor_to_torch

    reader = read_gguf(minillm.gguf_path())
    checked = 0
    for t in reader.tensors:
        if t.tensor_type.name == "Q4_1" and t.name.startswith(("blk.0.", "blk.29.")):
            w = tensor_to_torch(t)
            assert torch.equal(fake_quantize(w, 4, 32, symmetric=False), w), t.name
            assert not torch.equal(fake_quantize(w, 4, 64, symmetric=True), w), t.name
            checked += 1
    assert checked == 14


@pytest.mark.slow
def test_int8_perplexity_within_half_a_percent(smollm2):
    from minillm.model.perplexity import perplexity

    model, tok = smollm2
    text = open(ASSETS / "heldout.txt").read()
    fp32 = perplexity(model, tok, text, max_tokens=512)
    int8 = perplexity(quantize(copy.deepcopy(model), "int8"), tok, text, max_tokens=512)
    assert abs(int8 / fp32 - 1) < 0.005
    int8_head = perplexity(quantize(copy.deepcopy(model), "int8", head="int8"), tok, text, max_tokens=512)
    assert abs(int8_head / fp32 - 1) < 0.005


@pytest.mark.slow
def test_bfloat16_model_perplexity_within_half_a_percent(smollm2):
    from minillm.model.perplexity import perplexity

    model, tok = smollm2
    text = open(ASSETS / "heldout.txt").read()
    fp32 = perplexity(model, tok, text, max_tokens=1024)
    bf16 = perplexity(copy.deepcopy(model).bfloat16(), tok, text, max_tokens=1024)
    assert next(minillm.load_pretrained(dtype="bfloat16")[0].parameters()).dtype == torch.bfloat16
    assert abs(bf16 / fp32 - 1) < 0.005, (bf16, fp32)
    with pytest.raises(ValueError, match="dtype must be one of \\['bfloat16', 'float32'\\]"):
        minillm.load_pretrained(dtype=torch.float16)


@pytest.mark.slow
def test_perplexity_matches_hf_loss(smollm2, hf_smollm2):
    model, tok = smollm2
    ids = torch.tensor(tok.encode(open(ASSETS / "heldout.txt").read())[:256])
    total, count = nll_sum(model, ids, context=256)
    with torch.inference_mode():
        hf_loss = hf_smollm2[0](ids[None], labels=ids[None]).loss.item()  # HF shifts labels itself
    assert math.isclose(total / count, hf_loss, rel_tol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["mixture", Path(__file__).resolve().parents[1] / "data" / "shakespeare.txt"])
def test_calibration_is_disjoint_from_the_evaluation_texts(source):
    from minillm.quant import calibration_ids
    from minillm.tokenization.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained("smollm2-135m")
    calib = calibration_ids(tok, 24, 256, source)
    assert calib.shape == (24, 256)
    grams = lambda ids, n: {tuple(ids[i:i + n]) for i in range(len(ids) - n)}  # noqa: E731
    # no shared passage: no 8-token run shared with the prose; with the code, no 16-token run (two Python
    # projects share short idioms, 8 tokens of indentation and a keyword, but no passage)
    for name, n in (("heldout.txt", 8), ("heldout_code.txt", 16)):
        ours = set().union(*(grams(row.tolist(), n) for row in calib))
        shared = ours & grams(tok.encode((ASSETS / name).read_text()), n)
        assert not shared, f"{len(shared)} {n}-token sequences appear in both the calibration windows and {name}"
    if source == "mixture":   # an equal share of each part: SmolLM2's answers, Shakespeare, code
        from minillm.quant.calibration import calibration_parts

        parts = calibration_parts()
        assert list(parts) == ["smollm2", "shakespeare", "code"]
        for row, text in zip(calib[::8], parts.values()):
            assert tok.decode(row[:12].tolist()) in text


@pytest.mark.slow
def test_gptq_and_awq_beat_rtn_on_two_held_out_domains(smollm2):
    """GPTQ (act-order) and AWQ calibrated on the mixture each beat round-to-nearest at int4 g64 on
    prose (Flask's docs) and on code (Flask's modules), neither of which they saw."""
    from minillm.model.perplexity import perplexity
    from minillm.quant import calibration_ids

    model, tok = smollm2
    calib = calibration_ids(tok, 12, 256)   # half of what bench quant calibrates on, to keep the suite short
    texts = {name: (ASSETS / name).read_text() for name in ("heldout.txt", "heldout_code.txt")}
    ppl = lambda m: {k: perplexity(m, tok, t, max_tokens=384) for k, t in texts.items()}  # noqa: E731
    fp32 = ppl(model)
    rtn = ppl(quantize(copy.deepcopy(model), "int4", group_size=64, symmetric=True))
    for method, options in (("gptq", dict(act_order=True, damp=0.01)), ("awq", {})):
        q = ppl(quantize(copy.deepcopy(model), method, group_size=64, symmetric=True, calibration=calib, **options))
        for name in texts:
            assert fp32[name] < q[name] < rtn[name], (method, name, fp32[name], q[name], rtn[name])


def test_load_stack_shows_calibration_progress_layer_by_layer(monkeypatch, capsys):
    """GPTQ/AWQ calibrate for a minute on SmolLM2: the CLI's stack shows a bar, one step per layer."""
    import minillm.backends.stack as stack

    torch.manual_seed(0)
    tiny_model = Transformer(tiny(hidden_dim=192)).eval()
    monkeypatch.setattr(stack, "load_pretrained", lambda name, dtype, progress=None: (tiny_model, None))
    monkeypatch.setattr(stack, "calibration_ids", lambda tok, n, T: torch.randint(0, 512, (4, 32)))
    # tqdm redraws at most every 0.1 s and this bar is cleared when done: on a fast CPU both tiny layers finished
    # inside one interval and "2/2" was never drawn. Redraw on every step, so the test does not race the clock.
    import functools

    import minillm.progress
    monkeypatch.setattr(minillm.progress, "tqdm", functools.partial(minillm.progress.tqdm, mininterval=0))
    model, _ = stack.load_stack(quant="awq", group_size=32, progress=True)
    err = capsys.readouterr().err
    assert "awq calibration, layers" in err and "2/2" in err
    assert isinstance(model.layers[0].attn.wq, Int4Linear)
    stack.load_stack(quant="int4", group_size=32, progress=True)      # nothing to calibrate: no bar
    assert "calibration" not in capsys.readouterr().err


def test_bench_quant_times_widths_in_turns_and_splits_the_eight_token_step():
    """bench quant's forward costs (every width timed, the same number of times) and its split of the 8-token
    step: the linears alone are every block's linear and the head, each called on T rows."""
    from minillm.bench.quant import eight_token_extra, forward_costs, linear_costs

    torch.manual_seed(0)
    model = Transformer(tiny(max_seq_len=512)).eval()
    costs = forward_costs(model, torch.randint(0, 512, (1, 32)), widths=(1, 2, 8), repeats=2)
    assert list(costs) == [1, 2, 8] and all(s > 0 for s in costs.values())
    rows_seen = {}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_hook(lambda m, args, out: rows_seen.setdefault(m, []).append(args[0].shape[0]))
             for m in linears]
    ms = linear_costs(model, widths=(1, 8), repeats=1)
    for h in hooks:
        h.remove()
    assert len(linears) == 7 * model.config.n_layers + 1 and set(rows_seen) == set(linears)
    first = set(m for m in model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    for m, rows in rows_seen.items():       # a warm-up round, a timed one; the first block's also once per block
        calls = 1 + (model.config.n_layers if m in first else 0)                 # "body in cache"
        assert sorted(rows) == [1] * 2 * calls + [8] * 2 * calls
    assert set(ms) == {"body", "head", "body in cache", "body_mb"}
    assert all(v > 0 for part in ("body", "head", "body in cache") for v in ms[part].values())
    body_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears if m is not model.output)
    assert ms["body_mb"] == round(body_bytes / 1e6, 1)
    row = {"forward_ms": {"compiled": {"1": 10.0, "8": 13.0}}, "linear_ms": {"body": {"1": 6.0, "8": 7.0},
                                                                              "head": {"1": 1.0, "8": 1.5}}}
    assert eight_token_extra(row) == {"step": 3.0, "blocks": 1.0, "head": 0.5, "rest": 1.5}


def test_bench_quant_times_several_models_in_turns():
    """forward_costs_in_turns: every width of every model timed in each round (the models' forwards interleave)."""
    from minillm.bench.quant import forward_costs_in_turns

    torch.manual_seed(0)
    models = {name: Transformer(tiny(max_seq_len=512)).eval() for name in ("a", "b")}
    order = []
    for name, m in models.items():
        m.register_forward_hook(lambda m, args, out, name=name: order.append((name, args[0].shape[1])))
    costs = forward_costs_in_turns(models, torch.randint(0, 512, (1, 32)), widths=(1, 4), repeats=2)
    assert {k: list(v) for k, v in costs.items()} == {"a": [1, 4], "b": [1, 4]}
    timed = [o for o in order if o[1] != 32]                         # the context's prefill left out
    assert len(timed) == 4 * 4 and {timed[i][0] for i in range(4)} == {"a", "b"}   # 2 warm-up + 2 rounds, 4 each
