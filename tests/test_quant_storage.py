"""A quantized model saved to safetensors and loaded back is the same model, tied head included."""
import json

import pytest
import torch
from safetensors import safe_open

from minillm.model.train import save_checkpoint
from minillm import ModelFileError, load_quantized, quantize, save_quantized
from minillm.model import Transformer, tiny
from minillm.quant import Int4Linear, Int8Linear, set_impl


def tiny_model(**changes):
    torch.manual_seed(0)
    return Transformer(tiny(hidden_dim=192, **changes)).eval()    # 64 and 192: group sizes 32 and 64 both divide


@pytest.mark.parametrize("method, head, dtype", [("int4", None, torch.float32), ("int8", "int8", torch.float32),
                                                 ("int4", "int8", torch.bfloat16)])
def test_save_load_round_trip_gives_the_same_logits(tmp_path, method, head, dtype):
    model = set_impl(quantize(tiny_model().to(dtype), method, group_size=32, head=head), "ref")
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    loaded = load_quantized(path, impl="ref")
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    kinds = {name: type(m) for name, m in loaded.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    assert kinds == {name: type(m) for name, m in model.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    assert loaded.tok_embeddings.weight.dtype == dtype
    tied = head is None
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == tied      # the float head is tied again
    with safe_open(str(path), framework="pt") as f:
        assert ("output.weight" in f.keys()) != tied                            # ... and was stored once
        assert json.loads(f.metadata()["tied"]) == tied


def test_file_is_smaller_than_the_float_model(tmp_path):
    model = tiny_model(vocab_size=64)
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    save_quantized(quantize(model, "int4", group_size=32), tmp_path / "q.safetensors")
    assert (tmp_path / "q.safetensors").stat().st_size < 0.4 * float_bytes


def test_bad_files_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no quantized linear"):
        save_quantized(tiny_model(), tmp_path / "float.safetensors")
    with pytest.raises(ModelFileError, match="not found"):
        load_quantized(tmp_path / "missing.safetensors")
    path = tmp_path / "q.safetensors"
    save_quantized(quantize(tiny_model(), "int4", group_size=32), path)
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="corrupt or not a minillm quantized model"):
        load_quantized(tmp_path / "cut.safetensors")
    save_checkpoint(tiny_model(), tmp_path / "float.safetensors")   # a float checkpoint is not one
    with pytest.raises(ModelFileError, match="format 'minillm', expected 'minillm-quantized'"):
        load_quantized(tmp_path / "float.safetensors")
