"""model/train.py on tiny configs: the loss goes down, the schedule has its shape, checkpoints round-trip."""
import json
import math
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file

from minillm.model.loading import ModelFileError
from minillm.model import Transformer, tiny
from minillm.model.train import (TrainConfig, bytes_to_text, get_batch, load_checkpoint, lr_at, save_checkpoint,
    split, text_to_bytes, train)
from minillm.cli.train import train_cli

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 40


def small_model(**changes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny(vocab_size=256, dim=32, n_layers=1, hidden_dim=64, **changes))


def test_bytes_round_trip_and_split():
    for text in ["", "a", "hé", "日本", "🙂 emoji", TEXT]:
        ids = text_to_bytes(text)
        assert ids.dtype == torch.long and ids.dim() == 1 and len(ids) == len(text.encode())
        assert bytes_to_text(ids) == text
    assert text_to_bytes("hé").tolist() == [104, 195, 169]
    train_part, val_part = split(torch.arange(100), val_fraction=0.1)
    assert train_part.tolist() == list(range(90)) and val_part.tolist() == list(range(90, 100))
    with pytest.raises(ValueError, match="val_fraction"):
        split(torch.arange(10), val_fraction=1.0)


def test_batches_are_shifted_windows_and_seeded():
    data = torch.arange(1000)
    x, y = get_batch(data, 4, 16, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)                          # targets are the next token
    x2, _ = get_batch(data, 4, 16, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)                             # same seed, same batch
    with pytest.raises(ValueError, match="seq_len=16 needs 17"):
        get_batch(torch.arange(10), 4, 16, torch.Generator())


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(steps=101, warmup=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(s, cfg) for s in range(cfg.steps)]
    warm, decay = lrs[:cfg.warmup], lrs[cfg.warmup - 1:]
    assert all(a < b for a, b in zip(warm, warm[1:]))     # strictly rising during warmup
    assert math.isclose(lrs[cfg.warmup - 1], cfg.lr)      # reaches the peak at the end of warmup
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # never rises after
    assert math.isclose(lrs[-1], cfg.min_lr)              # ends exactly at min_lr
    assert math.isclose(lrs[cfg.warmup + 45], (cfg.lr + cfg.min_lr) / 2)  # cosine: halfway at the middle


def test_a_few_steps_lower_the_loss():
    data = text_to_bytes(TEXT)
    train_data, val_data = split(data)
    model = small_model()
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=32, warmup=5, eval_every=10, eval_steps=2)
    threads = torch.get_num_threads()
    history = train(model, train_data, val_data, cfg, progress=False)
    assert torch.get_num_threads() == threads             # train's threads=1 is undone afterwards
    assert len(history["train_loss"]) == len(history["lr"]) == 30
    assert history["val_step"] == [9, 19, 29]
    assert history["train_loss"][0] > 5.0                 # ~ ln 256 = 5.55 at initialisation
    assert history["train_loss"][-1] < history["train_loss"][0] - 1.0
    assert history["val_loss"][-1] < history["val_loss"][0]


def test_aux_loss_and_callback_hooks():
    """A model that exposes `aux_loss` has it added to the loss; callback results are recorded."""
    model = small_model()
    set_aux = lambda m, inputs, output: setattr(m, "aux_loss", m.norm.weight.sum() * 0.0 + 0.5)  # noqa: E731
    model.register_forward_hook(set_aux)  # like an MoE forward: a fresh 0.5 in the graph each call
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup=1, eval_every=3, eval_steps=1)
    data = text_to_bytes(TEXT)
    history = train(model, data, data, cfg, progress=False, callback=lambda step, m: {"load": [step, 1.0]})
    assert history["aux_loss"] == [0.5, 0.5, 0.5]
    assert history["metrics"] == [{"step": s, "load": [s, 1.0]} for s in range(3)]


@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_round_trip(tmp_path, tie):
    model = small_model(tie_embeddings=tie).eval()
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(model, path)
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == tie
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


def test_missing_and_corrupt_checkpoints_name_the_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelFileError, match="nope.safetensors not found"):
        load_checkpoint(missing)

    model = small_model()
    good = tmp_path / "good.safetensors"
    save_checkpoint(model, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ModelFileError, match="truncated.safetensors is corrupt"):
        load_checkpoint(truncated)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelFileError, match="garbage.safetensors is corrupt"):
        load_checkpoint(garbage)

    no_config = tmp_path / "no_config.safetensors"
    save_file({"w": torch.zeros(2)}, str(no_config))  # valid safetensors, but not ours
    with pytest.raises(ModelFileError, match="no_config.safetensors is corrupt or not a minillm checkpoint"):
        load_checkpoint(no_config)


def test_cli_trains_and_saves(tmp_path, capsys):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    out = tmp_path / "tiny.safetensors"
    assert train_cli(["--data", str(text_file), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                      "--eval-steps", "1", "--no-progress", "--out", str(out)]) == 0
    assert "val loss" in capsys.readouterr().out
    assert load_checkpoint(out).config == tiny(vocab_size=256)


def test_bad_settings_and_outputs_are_refused_before_training(tmp_path, capsys):
    from minillm.cli.main import main

    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="min_lr <= lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    missing = tmp_path / "no_such_dir" / "model.safetensors"
    assert main(["train", "--steps", "1", "--out", str(missing), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err and not missing.parent.exists()
    assert main(["train", "--steps", "1", "--history", str(tmp_path), "--no-progress"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["train", "--batch-size", "0", "--no-progress"]) == 2
    assert "batch_size must be a positive int" in capsys.readouterr().err


def test_a_header_declaring_a_huge_model_is_refused_before_allocating(tmp_path):
    """A few hundred bytes that declare a 100-GB model: checked on the meta device, nothing allocated."""
    huge = dict(asdict(tiny()), vocab_size=1 << 20, dim=1 << 15, n_heads=256, n_kv_heads=256, n_layers=1024)
    path = tmp_path / "huge.safetensors"
    save_file({"tok_embeddings.weight": torch.zeros(2, 2)}, str(path), metadata={"config": json.dumps(huge)})
    assert path.stat().st_size < 1000
    with pytest.raises(ModelFileError, match="huge.safetensors: the minillm checkpoint does not match its config"):
        load_checkpoint(path)
    beyond = dict(huge, n_layers=10**6)
    save_file({"w": torch.zeros(2)}, str(path), metadata={"config": json.dumps(beyond)})
    with pytest.raises(ModelFileError, match=r"config n_layers must be an int in \[1, 1024\], got 1000000"):
        load_checkpoint(path)


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    model = small_model()
    with torch.no_grad():
        model.layers[0].attn.wq.weight[0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_checkpoint(model, path)
    with pytest.raises(ModelFileError, match=r"NaN or infinite values in \['layers.0.attn.wq.weight'\]"):
        load_checkpoint(path)
