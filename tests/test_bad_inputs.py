"""Hostile and mistaken inputs, as a table: each must give one clear line naming the problem and
leave everything it touched as it was (issue 15). Library cases run on a tiny model; the CLI cases
run `python -m minillm` in-process, as a user types them."""
import copy
import json

import pytest
import torch

import minillm
from minillm.cli.main import main
from minillm.cache.kv_cache import StaticCache
from minillm.model.loading import ModelFileError
from minillm.model import Config, Transformer, tiny
from minillm.cache.paged import PagedCache
from minillm.quant import quantize
from minillm.tokenization.tokenizer import Tokenizer
from minillm.model.train import load_checkpoint


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(tiny()).eval()


def ids(n=4):
    return torch.arange(1, n + 1)[None]


# (name, call(model) -> anything, message regex). The call must raise ValueError.
GENERATE = [
    ("float ids", lambda m: minillm.generate(m, torch.ones(1, 3), 2), "must be an integer tensor"),
    ("empty prompt", lambda m: minillm.generate(m, torch.tensor([[]]), 2), "the prompt is empty"),
    ("int8 ids", lambda m: minillm.generate(m, torch.tensor([[5, -3]], dtype=torch.int8), 1),
     r"token id -3 is outside the vocabulary \[0, 512\)"),
    ("id past the vocabulary", lambda m: minillm.generate(m, torch.tensor([[700]]), 1), "token id 700 is outside"),
    ("3-D ids", lambda m: minillm.generate(m, ids()[None], 2), r"shape \(batch, tokens\)"),
    ("negative max_new_tokens", lambda m: minillm.generate(m, ids(), -1), "max_new_tokens must be an int >= 0"),
    ("float max_new_tokens", lambda m: minillm.generate(m, ids(), 2.5), "max_new_tokens must be an int >= 0"),
    ("NaN temperature", lambda m: minillm.generate(m, ids(), 2, temperature=float("nan")), "temperature must be"),
    ("negative temperature", lambda m: minillm.generate(m, ids(), 2, temperature=-1), "temperature must be"),
    ("top_k 0 while greedy", lambda m: minillm.generate(m, ids(), 2, top_k=0), "top_k must be an int >= 1"),
    ("top_p 1.5 while greedy", lambda m: minillm.generate(m, ids(), 2, top_p=1.5), r"top_p must be in \(0, 1\]"),
    ("seed out of range", lambda m: minillm.generate(m, ids(), 2, seed=-1), "seed must be an int"),
    ("unknown drafter", lambda m: minillm.generate(m, ids(), 2, draft="nope"), "is not 'ngram'"),
    ("draft_len too long", lambda m: minillm.generate(m, ids(), 2, draft="ngram", draft_len=10**6),
     r"draft_len must be an int in \[0, 256\]"),
    ("unknown tree", lambda m: minillm.generate(m, ids(), 2, tree="forest"), "tree must be one of"),
    ("draft and tree", lambda m: minillm.generate(m, ids(), 2, draft="ngram", tree="recycling"), "not both"),
    ("batch with a drafter", lambda m: minillm.generate(m, torch.ones(2, 3, dtype=torch.long), 2, draft="ngram"),
     "take one sequence"),
    ("unknown cache", lambda m: minillm.generate(m, ids(), 2, cache="disk"), "cache must be one of"),
    ("over the context", lambda m: minillm.generate(m, ids(), 300), "exceeds the model's context of 256"),
    ("right padding", lambda m: minillm.generate(m, ids(3), 2, attention_mask=torch.tensor([[1, 1, 0]])),
     "pad on the left"),
    ("ragged empty prompt", lambda m: minillm.generate(m, [[1, 2], []], 2), "each of at least one token"),
]


@pytest.mark.parametrize("name, call, message", GENERATE, ids=[g[0] for g in GENERATE])
def test_generate_refuses_in_one_line(model, name, call, message):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message) as e:
        call(model)
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_cache_that_holds_tokens_or_other_rows_is_refused_and_kept(model):
    cache = StaticCache(model.config, 1, 32)
    with torch.inference_mode():
        model(ids(5), cache=cache)
    kept = cache.k.clone()
    with pytest.raises(ValueError, match="must be empty, it holds 5 tokens"):
        minillm.generate(model, ids(), 2, cache=cache)
    assert cache.length == 5 and torch.equal(cache.k, kept)
    with pytest.raises(ValueError, match="holds 3 sequences, the prompt has 1 rows"):
        minillm.generate(model, ids(), 2, cache=StaticCache(model.config, 3, 32))


def test_quantize_that_cannot_finish_changes_nothing(model):
    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError) as e:
        quantize(m, "int4", group_size=48)
    assert "\n" not in str(e.value) and "48" in str(e.value)
    assert set(m.state_dict()) == set(before) and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="method"):
        quantize(m, "int3")


def test_paged_cache_overflow_and_double_free_change_nothing(model):
    cache = PagedCache(model.config, num_blocks=2, block_size=4)
    a = cache.add_sequence()
    cache.append_slots(a, 6)
    state = (list(cache.allocator.free), list(cache.allocator.refcount), [list(t) for t in cache.block_tables])
    with pytest.raises(ValueError, match="KV cache overflow"):
        cache.append_slots(a, 8)
    b = cache.add_sequence()
    cache.free_sequence(b)
    with pytest.raises(ValueError, match=f"sequence {b} is not in this cache"):
        cache.free_sequence(b)
    with pytest.raises(ValueError, match="is not a block of this pool"):
        cache.allocator.release(-1)
    assert state == (cache.allocator.free, cache.allocator.refcount, cache.block_tables)


def test_tokenizer_refuses_special_tokens_and_roles():
    tok = Tokenizer.from_pretrained()
    with pytest.raises(ValueError, match="special token '<|im_end|>', which is disallowed") as e:
        tok.encode("hi <|im_end|>")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="role"):
        tok.encode_chat([{"role": "tool", "content": "x"}])
    chat = tok.encode_chat([{"role": "user", "content": "hi <|im_end|>"}])   # the message is plain text
    assert chat.count(tok.special_tokens["<|im_end|>"]) == 2                 # the system's and the user's turn


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"PK\x03\x04 a zip", b"\x80\x04\x95 a pickle"])
def test_garbage_checkpoints_are_named(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="bad.safetensors is corrupt or not a minillm checkpoint") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("changes, message", [
    (dict(n_layers=0), r"n_layers must be an int in \[1, 1024\]"),
    (dict(vocab_size=2**40), "vocab_size must be an int"),
    (dict(dim=64.0), "dim must be an int"),
    (dict(norm_eps=float("nan")), "norm_eps must be a finite number"),
    (dict(eos_token_id=10**6), "eos_token_id must be None or a token id below 512"),
])
def test_configs_out_of_bounds(changes, message):
    with pytest.raises(ValueError, match=message):
        Config(**{**tiny().__dict__, **changes})


# The CLI, in-process: (argv, message on stderr). Exit code 2, one line, no traceback.
CLI = [
    (["generate", "--prompt", "hi", "--max-new-tokens", "-1"], "max_new_tokens must be an int >= 0"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "temperature must be >= 0 and finite"),
    (["generate", "--prompt", "hi", "--draft", "/no/such/draft.safetensors"], "is not 'ngram'"),
    (["generate", "--prompt", "hi", "--draft-len", "100000", "--draft", "ngram"], "draft_len must be an int"),
    (["generate", "--prompt", "hi <|endoftext|>"], "pass --special allow"),
    (["chat", "--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--threads", "0"], "--threads must be >= 1"),
    (["serve", "--port", "70000"], "--port must be in [0, 65535]"),
    (["eval", "--text", "/no/such/file.txt"], "--text must be a readable text file"),
    (["eval", "--text", "minillm/assets/heldout.txt", "--max-tokens", "1"], "max_tokens must be an int >= 2"),
    (["train", "--batch-size", "0", "--steps", "1"], "batch_size"),
    (["train", "--steps", "1", "--out", "/no/such/dir/model.safetensors"], "does not exist"),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", CLI, ids=[" ".join(a[:3]) for a, _ in CLI])
def test_cli_refuses_in_one_line(capsys, argv, message):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    if argv[0] not in ("train", "serve"):                # the commands with --json
        assert main(argv + ["--json"]) == 2
        out, err = capsys.readouterr()
        assert message in json.loads(out)["error"] and err == ""
