"""Tree attention: mask and positions, one-forward verification == path by path, acceptance, cache
compaction, and tree decoding == plain greedy (tiny model; SmolLM2 in the slow tests)."""
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm import generate, tiny
from minillm.cache.kv_cache import StaticCache
from minillm.decoding.medusa import MedusaDrafter, MedusaHeads, template_from_accuracy
from minillm.model import Transformer
from minillm.decoding import decode
from minillm.decoding.drafters import ModelDrafter, NgramDrafter
from minillm.decoding.tree import (MergedDrafter, Template, TokenRecycling, Tree, accept_greedy, accept_typical,
    depths, dynamic_tree, dynamic_tree_ref, merge, path_to, score as verify, tree_mask, tree_mask_ref,
    verification_inputs)


def random_tree(rng, n, vocab):
    return Tree([rng.randrange(vocab) for _ in range(n)], [-1] + [rng.randrange(i) for i in range(1, n)])


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Transformer(tiny()).eval()


def test_small_tree_by_hand():
    parents = [-1, 0, 0, 1]
    assert depths(parents).tolist() == [0, 1, 1, 2]
    assert path_to(parents, 3) == [0, 1, 3]
    assert tree_mask(parents).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    tokens, positions, mask = verification_inputs(Tree([5, 6, 7, 8], parents), prefix_len=2)
    assert tokens.tolist() == [[5, 6, 7, 8]] and positions.tolist() == [[2, 3, 3, 4]]
    assert mask.shape == (1, 1, 4, 6) and mask[0, 0, :, :2].all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 0.999), min_size=0, max_size=30))
def test_tree_mask_matches_reference(fractions):
    parents = [-1] + [int(f * i) for i, f in enumerate(fractions, start=1)]
    assert torch.equal(tree_mask(parents), tree_mask_ref(parents))


@pytest.mark.parametrize("parents", [[], [0], [-1, 1], [-1, 0, 3, 1]])
def test_bad_trees_raise(parents):
    with pytest.raises(ValueError, match="parent"):
        Tree([1] * len(parents), parents)


def test_templates():
    assert Template.budget(depth=3, budget=0).parents == [-1, 0, 1, 2]  # a chain
    t = Template.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0)])
    assert t.parents == [-1, 0, 0, 1, 1, 2] and t.choices == [0, 0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="no parent path"):
        Template.from_paths([(0, 0)])
    # head 0 is right 60% / 30% with its 1st / 2nd choice, head 1 50% / 10%: best 3 paths
    tuned = template_from_accuracy([[0.6, 0.3], [0.5, 0.1]], size=4)
    assert Template.from_paths([(0,), (1,), (0, 0)]) == tuned


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_tree_logits_equal_path_by_path(tiny_model, dtype, atol):
    model = Transformer(tiny()).to(dtype).eval()
    model.load_state_dict(tiny_model.state_dict())
    rng = random.Random(1)
    prefix = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for n in (1, 5, 13):
            tree = random_tree(rng, n, 512)
            cache = StaticCache(model.config, 1, 32, dtype=dtype)
            model(prefix, cache=cache)
            logits, _ = verify(model, cache, tree)
            for i in range(n):
                path = torch.tensor([[tree.tokens[j] for j in path_to(tree.parents, i)]])
                expected = model(torch.cat([prefix, path], 1))[0, -1]
                torch.testing.assert_close(logits[i], expected, atol=atol, rtol=0)


def test_compaction_equals_plain_run(tiny_model):
    prefix = torch.tensor([[3, 1, 4, 1, 5]])
    tree = Tree([9, 2, 6, 5, 3, 5], [-1, 0, 0, 2, 1, 3])
    keep_nodes = path_to(tree.parents, 3)                      # [0, 2, 3]
    with torch.inference_mode():
        cache = StaticCache(tiny_model.config, 1, 16)
        tiny_model(prefix, cache=cache)
        verify(tiny_model, cache, tree)
        cache.keep(5, [5 + i for i in keep_nodes])
        plain = StaticCache(tiny_model.config, 1, 16)
        tiny_model(torch.cat([prefix, torch.tensor([[tree.tokens[i] for i in keep_nodes]])], 1), cache=plain)
    assert cache.length == plain.length == 8
    assert torch.equal(cache.positions[:, :8], plain.positions[:, :8])
    for layer in range(tiny_model.config.n_layers):
        torch.testing.assert_close(cache.k[layer, :, :, :8], plain.k[layer, :, :, :8], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.v[layer, :, :, :8], plain.v[layer, :, :, :8], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="increasing slots"):
        cache.keep(5, [7, 6])


def logits_choosing(choices, vocab=10):
    """(N, vocab) logits whose argmax at node i is choices[i]."""
    return torch.nn.functional.one_hot(torch.tensor(choices), vocab).float() * 5


def test_accept_greedy_takes_the_longest_matching_path():
    tree = Tree([0, 4, 7, 8, 1, 2], [-1, 0, 0, 2, 2, 3])      # root -> {4, 7}; 7 -> {8, 1}; 8 -> {2}
    path, nxt = accept_greedy(tree, logits_choosing([7, 0, 8, 2, 0, 6]))
    assert path == [0, 2, 3, 5] and nxt == 6
    path, nxt = accept_greedy(tree, logits_choosing([3, 0, 0, 0, 0, 0]))  # nothing matches: plain decoding
    assert path == [0] and nxt == 3


def test_accept_typical():
    tree = Tree([0, 1, 2], [-1, 0, 1])
    logits = torch.tensor([[0.0, 0.0, -9.0], [-9.0, -9.0, 3.0], [0.0, 0.0, 0.0]])  # root flat over {0, 1}
    path, _ = accept_typical(tree, logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert path == [0, 1, 2]                     # token 1 is not the argmax at the root, but typical enough
    assert accept_greedy(tree, logits)[0] == [0]  # greedy only takes the argmax (token 0)
    with pytest.raises(ValueError, match="temperature > 0"):
        accept_typical(tree, logits, temperature=0)


class OracleDrafter:
    """Knows the greedy continuation `truth`; hides it on the branch (slot, 0, 0, ...), random tokens elsewhere."""

    def __init__(self, truth, start, template, slot):
        self.truth, self.pos, self.template, self.slot = truth, start, template, slot  # truth[pos] is the root
        self.rng, self.seen_prompt = random.Random(0), False

    def propose(self, context, k, hidden=None, **sampling):
        root = context[-1]
        assert root == self.truth[self.pos]
        tokens = [root]
        for i in range(1, len(self.template)):
            choices = [self.template.choices[j] for j in path_to(self.template.parents, i)[1:]]
            on_truth = choices == [self.slot] + [0] * (len(choices) - 1) and self.pos + len(choices) < len(self.truth)
            tokens.append(self.truth[self.pos + len(choices)] if on_truth else self.rng.randrange(512))
        return Tree(tokens, list(self.template.parents)).prefix(k + 1)

    def observe(self, tree, logits, hidden=None):
        if self.seen_prompt:
            self.pos += len(accept_greedy(tree, logits)[0])
        self.seen_prompt = True


def test_tree_decoding_equals_plain_greedy_tiny(tiny_model):
    prompt = torch.tensor([[5, 17, 33, 2, 9]])
    plain = generate(tiny_model, prompt, 40, eos_token_id=None)
    truth = plain[0].tolist()
    for drafter in (OracleDrafter(truth, 5, Template.budget(3, 1), slot=1),
                    TokenRecycling(512, k=4, template=Template.budget(3, 2)),
                    MedusaDrafter(tiny_model, MedusaHeads(64, 3), Template.budget(3, 2), k=4)):
        result = decode(tiny_model, prompt, 40, drafter, eos_token_id=None)
        assert result.tokens == plain[0, 5:].tolist(), type(drafter).__name__
        assert len(result.tokens) == 40
    assert result.verify_forwards <= 39
    result = decode(tiny_model, prompt, 40, OracleDrafter(truth, 5, Template.budget(3, 1), 1), eos_token_id=None)
    assert result.verify_forwards <= 12          # 4 tokens per forward when the oracle's path is always found


def test_token_recycling_state():
    tr = TokenRecycling(49152, k=8)
    assert tr.nbytes() == 49152 * 8 * 4 < 2 * 2**20
    tr.update(torch.tensor([5, 6]), logits_choosing([3, 4], vocab=20))
    assert tr.adjacency[5, 0] == 3 and tr.adjacency[6, 0] == 4
    tree = TokenRecycling(20, k=2, template=Template.budget(2, 0))
    tree.update(torch.tensor([5, 3]), logits_choosing([3, 4], vocab=20))
    assert tree.propose([5], 2).tokens == [5, 3, 4]  # 5 -> 3 -> 4, read off the adjacency matrix
    with pytest.raises(ValueError, match="top-2"):
        TokenRecycling(20, k=2, template=Template.budget(1, 2))


def test_token_recycling_update_keeps_the_last_occurrence():
    torch.manual_seed(0)
    tokens, logits = torch.tensor([4, 7, 4, 9, 7, 4]), torch.randn(6, 30)
    fast = TokenRecycling(30, k=3)
    fast.update(tokens, logits)
    slow = TokenRecycling(30, k=3)
    for t, row in zip(tokens.tolist(), logits):          # one row at a time: later writes win
        slow.adjacency[t] = row.topk(3).indices.to(torch.int32)
    assert torch.equal(fast.adjacency, slow.adjacency)
    assert torch.equal(fast.adjacency[4], logits[5].topk(3).indices.to(torch.int32))


def choice_paths(tree: Tree, adjacency, pairs=None, before=None) -> set:
    """Each node past the root as its path of choice indices (which guess of the row its parent read it is: the
    parent's pair's, where `pairs` has it, else the parent's token's)."""
    paths = {0: ()}
    for i in range(1, len(tree)):
        p = tree.parents[i]
        key = (tree.tokens[tree.parents[p]] if p else before, tree.tokens[p])
        row = pairs[key][0] if pairs and key in pairs else adjacency[tree.tokens[p]].tolist()
        paths[i] = paths[p] + (row.index(tree.tokens[i]),)
    return set(paths.values()) - {()}


def random_guesses(vocab: int, k: int, g, pairs: int = 0):
    """A random adjacency matrix, its sorted probabilities, and `pairs` random two-token keys' guesses."""
    adjacency = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(vocab)]).to(torch.int32)
    probs = torch.rand(vocab, k, generator=g).sort(dim=-1, descending=True).values
    keyed = {(int(a), int(b)): (torch.randperm(vocab, generator=g)[:k].tolist(),
                                torch.rand(k, generator=g).sort(descending=True).values.tolist())
             for a, b in torch.randint(0, vocab, (pairs, 2), generator=g)}
    return adjacency, probs, keyed


def test_dynamic_tree_keeps_the_likeliest_paths_as_the_reference_enumerates_them():
    g = torch.Generator().manual_seed(0)
    for _trial in range(30):
        size = int(torch.randint(1, 7, (1,), generator=g))
        adjacency, probs, _ = random_guesses(12, 3, g)
        tree = dynamic_tree(3, adjacency, probs, size)
        assert len(tree) == size + 1 and tree.tokens[0] == 3
        assert choice_paths(tree, adjacency) == dynamic_tree_ref(3, adjacency, probs, size)
    # confident guesses grow a chain, unsure ones a bush: the shape follows the probabilities
    adjacency = torch.tensor([[1, 2], [2, 0], [0, 1]], dtype=torch.int32)
    assert dynamic_tree(0, adjacency, torch.tensor([[0.9, 0.1]] * 3), 3).parents == [-1, 0, 1, 2]
    assert dynamic_tree(0, adjacency, torch.tensor([[0.5, 0.5]] * 3), 3).parents == [-1, 0, 0, 1]


def test_dynamic_token_recycling_stores_probabilities_and_stays_lossless(tiny_model):
    torch.manual_seed(0)
    tokens, logits = torch.tensor([4, 7, 4]), torch.randn(3, 30)
    tr = TokenRecycling(30, k=3, dynamic=True)
    tr.update(tokens, logits)
    top = logits[2].softmax(-1).topk(3)                 # token 4: its last occurrence's row
    assert torch.equal(tr.adjacency[4], top.indices.to(torch.int32)) and torch.allclose(tr.probs[4], top.values)
    assert tr.nbytes() == 30 * 3 * (4 + 4) and TokenRecycling(30, k=3).nbytes() == 30 * 3 * 4
    twin = tr.copy()
    assert twin.dynamic and torch.equal(twin.probs, tr.probs) and twin.probs is not tr.probs
    assert tr.propose([9, 4], 5).tokens == dynamic_tree(4, tr.adjacency, tr.probs, 5).tokens
    prompt = torch.tensor([[5, 17, 33, 2, 9, 5, 17]])
    plain = generate(tiny_model, prompt, 30, eos_token_id=None)
    warm = TokenRecycling(512, k=4, dynamic=True).warm_up(tiny_model, torch.randint(0, 512, (200,)), chunk=100)
    assert warm.probs.any() and decode(tiny_model, prompt, 30, warm.copy(), 7, eos_token_id=None).tokens == \
        plain[0, 7:].tolist()
    assert torch.equal(generate(tiny_model, prompt, 30, tree="recycling-dynamic", eos_token_id=None), plain)


def test_two_token_keys_back_off_to_the_token_and_match_the_reference():
    g = torch.Generator().manual_seed(1)
    for _trial in range(30):
        size = int(torch.randint(1, 7, (1,), generator=g))
        adjacency, probs, pairs = random_guesses(10, 3, g, pairs=25)
        tree = dynamic_tree(3, adjacency, probs, size, pairs, before=7)
        assert choice_paths(tree, adjacency, pairs, before=7) == dynamic_tree_ref(3, adjacency, probs, size, pairs,
                                                                                   before=7)
    tr = TokenRecycling(20, k=2, dynamic=True, context=2)
    tr.update(torch.tensor([5, 3, 9, 3]), logits_choosing([3, 9, 3, 4], vocab=20))
    assert tr.pairs[(5, 3)][0][0] == 9 and tr.pairs[(9, 3)][0][0] == 4 and tr.adjacency[3, 0] == 4
    assert (None, 5) not in tr.pairs and len(tr.pairs) == 3            # no token before the first: no pair
    assert tr.propose([5, 3], 1).tokens == [3, 9]                      # the pair (5, 3) says 9, token 3's row 4
    assert tr.propose([8, 3], 1).tokens == [3, 4]                      # an unseen pair backs off to the row
    tr.observe(Tree([3, 4], [-1, 0]), logits_choosing([7, 1], vocab=20))  # the proposal just made: before = 8
    assert tr.pairs[(8, 3)][0][0] == 7 and tr.pairs[(3, 4)][0][0] == 1
    assert tr.nbytes() == 20 * 2 * (4 + 4) + 5 * (8 + 2 * 8)
    twin = tr.copy()
    twin.update(torch.tensor([1, 2]), logits_choosing([0, 0], vocab=20))
    assert (1, 2) in twin.pairs and (1, 2) not in tr.pairs and twin.context == 2
    with pytest.raises(ValueError, match="need dynamic=True"):
        TokenRecycling(20, context=2)
    with pytest.raises(ValueError, match="last 1 or 2 tokens"):
        TokenRecycling(20, dynamic=True, context=3)


def test_two_token_keys_stay_lossless(tiny_model):
    prompt = torch.tensor([[5, 17, 33, 2, 9, 5, 17]])
    plain = generate(tiny_model, prompt, 30, eos_token_id=None)
    text = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(0))
    warm = TokenRecycling(512, k=4, dynamic=True, context=2).warm_up(tiny_model, text, chunk=100)
    t = text.tolist()                                     # each chunk's tokens after its first, as pairs
    assert len(warm.pairs) == len({(a, b) for c in (t[:100], t[100:]) for a, b in zip(c, c[1:])})
    result = decode(tiny_model, prompt, 30, warm.copy(), 7, eos_token_id=None)
    assert result.tokens == plain[0, 7:].tolist()
    assert torch.equal(generate(tiny_model, prompt, 30, tree="recycling-pairs", eos_token_id=None), plain)


def test_token_recycling_warm_up(tiny_model):
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(0))
    warm = TokenRecycling(512, k=4).warm_up(tiny_model, ids, chunk=128)
    slow = TokenRecycling(512, k=4)
    with torch.inference_mode():
        for start in range(0, 300, 128):                  # each chunk a context of its own
            logits = tiny_model(ids[None, start:start + 128])[0]
            for t, row in zip(ids[start:start + 128].tolist(), logits):
                slow.adjacency[t] = row.topk(4).indices.to(torch.int32)
    assert torch.equal(warm.adjacency, slow.adjacency) and warm.adjacency.any()
    twin = warm.copy()                                    # a request's own copy: the warm matrix stays as it was
    twin.update(torch.tensor([ids[0]]), torch.zeros(1, 512))
    assert not torch.equal(twin.adjacency, warm.adjacency) and twin.template is warm.template
    prompt = torch.tensor([[5, 17, 33, 2, 9]])
    plain = generate(tiny_model, prompt, 30, eos_token_id=None)
    assert decode(tiny_model, prompt, 30, warm.copy(), eos_token_id=None).tokens == plain[0, 5:].tolist()
    with pytest.raises(ValueError, match="chunk"):
        TokenRecycling(512).warm_up(tiny_model, ids, chunk=0)


def test_bad_input(tiny_model):
    drafter = TokenRecycling(512, k=4, template=Template.budget(2, 1))
    with pytest.raises(ValueError, match="one sequence"):
        decode(tiny_model, torch.zeros(2, 3, dtype=torch.long), 4, drafter)
    with pytest.raises(ValueError, match="draft_len"):
        decode(tiny_model, torch.zeros(1, 3, dtype=torch.long), 4, drafter, draft_len=-1)
    with pytest.raises(ValueError, match="heads"):
        MedusaDrafter(tiny_model, MedusaHeads(64, 1), Template.budget(2, 0))


def test_generate_tree_argument(tiny_model):
    prompt = torch.tensor([[5, 17, 33]])
    plain = generate(tiny_model, prompt, 20, eos_token_id=None)
    assert torch.equal(generate(tiny_model, prompt, 20, tree="recycling", eos_token_id=None), plain)
    with pytest.raises(ValueError, match="tree must be"):
        generate(tiny_model, prompt, 4, tree="forest")
    with pytest.raises(ValueError, match="not both"):
        generate(tiny_model, prompt, 4, tree="recycling", draft="ngram")
    # combinations the old separate loops refused: top-k with a tree, another cache
    assert torch.equal(generate(tiny_model, prompt, 20, tree="recycling", top_k=5, eos_token_id=None), plain)
    assert torch.equal(generate(tiny_model, prompt, 20, tree="recycling", cache="paged", eos_token_id=None), plain)


# ----------------------------------------------------------------------------- SmolLM2
PROMPTS = ["The history of the printing press begins in the fifteenth century, when",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Photosynthesis is the process by which plants"]


@pytest.mark.slow
def test_smollm2_tree_logits_equal_path_by_path(smollm2):
    model, tok = smollm2
    model64 = Transformer(model.config).double().eval()
    model64.load_state_dict(model.state_dict())
    rng = random.Random(0)
    with torch.inference_mode():
        for text in PROMPTS[:2]:
            prefix = torch.tensor([tok.encode(text)])
            tree = random_tree(rng, 8, model.config.vocab_size)
            for m, atol in ((model64, 1e-5), (model, 2e-4)):
                cache = StaticCache(model.config, 1, prefix.shape[1] + 8, dtype=next(m.parameters()).dtype)
                m(prefix, cache=cache)
                logits, _ = verify(m, cache, tree)
                for i in range(len(tree)):
                    path = torch.tensor([[tree.tokens[j] for j in path_to(tree.parents, i)]])
                    torch.testing.assert_close(logits[i], m(torch.cat([prefix, path], 1))[0, -1], atol=atol, rtol=0)


@pytest.mark.slow
def test_smollm2_tree_decoding_equals_plain_greedy(smollm2):
    from minillm.decoding.medusa import default_medusa_drafter

    model, tok = smollm2
    for text in PROMPTS:
        prompt = torch.tensor([tok.encode(text)])
        plain = generate(model, prompt, 64, eos_token_id=None)
        for drafter in (TokenRecycling(model.config.vocab_size), default_medusa_drafter(model)):
            result = decode(model, prompt, 64, drafter, eos_token_id=None)
            assert result.tokens == plain[0, prompt.shape[1]:].tolist(), (text, type(drafter).__name__)
            assert result.verify_forwards < 63  # the trees did accept something


def test_bench_tree_gives_each_warm_run_its_own_copy(tiny_model):
    from minillm.bench.tree import methods

    warm = TokenRecycling(tiny_model.config.vocab_size, k=4).warm_up(tiny_model, torch.arange(64))
    found = methods(tiny_model, warm)
    assert "tree: Token Recycling, warm" in found and "tree: Token Recycling, warm" not in methods(tiny_model)
    a, b = found["tree: Token Recycling, warm"](), found["tree: Token Recycling, warm"]()
    assert a is not b and torch.equal(a.adjacency, warm.adjacency) and a.adjacency.data_ptr() != warm.adjacency.data_ptr()
    dynamic = TokenRecycling(tiny_model.config.vocab_size, k=4, dynamic=True).warm_up(tiny_model, torch.arange(64))
    found = methods(tiny_model, warm, dynamic)
    assert found["tree: Token Recycling, dynamic"]().dynamic and not found["tree: Token Recycling"]().dynamic
    c = found["tree: Token Recycling, dynamic, warm"]()
    assert c.dynamic and torch.equal(c.probs, dynamic.probs) and c.probs.data_ptr() != dynamic.probs.data_ptr()
    pairs = TokenRecycling(tiny_model.config.vocab_size, k=4, dynamic=True, context=2).warm_up(tiny_model,
                                                                                              torch.arange(64))
    found = methods(tiny_model, warm, dynamic, pairs)
    assert found["tree: Token Recycling, pairs"]().pairs == {}
    d = found["tree: Token Recycling, pairs, warm"]()
    assert d.pairs == pairs.pairs and d.pairs is not pairs.pairs and len(d.pairs) == 63


def test_bench_warm_text_comes_from_other_requests_than_the_bench_prompts():
    """The warm matrix stands for earlier requests' answers: none of the requests behind the text is a bench
    prompt, and no 6-token run of a bench prompt appears in the text."""
    import importlib.util

    from minillm.bench import speculative, tree
    from minillm.tokenization.tokenizer import Tokenizer

    spec = importlib.util.spec_from_file_location("make_recycling_warm", Path(__file__).resolve().parents[1] / "data" / "make_recycling_warm.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    assert speculative.WARM_TEXT == maker.OUT
    tok = Tokenizer.from_pretrained("smollm2-135m")
    text = tok.encode(speculative.WARM_TEXT.read_text())
    assert len(text) >= speculative.WARM_TOKENS
    runs = {tuple(text[i:i + 6]) for i in range(len(text) - 5)}
    for prompt in speculative.GROUNDED + speculative.OPEN_ENDED + tree.PROMPTS:
        assert prompt not in maker.PROMPTS
        ids = tok.encode(prompt, allowed_special="all")
        assert not runs & {tuple(ids[i:i + 6]) for i in range(len(ids) - 5)}, prompt


def root_paths(tree):
    return {tuple(tree.tokens[j] for j in path_to(tree.parents, i)) for i in range(len(tree))}


def test_merge_lays_root_paths_over_one_another():
    chain, other = Tree.chain(7, [1, 2]), Tree([7, 1, 3, 4], [-1, 0, 1, 0])
    merged = merge([chain, other], 10)
    assert (merged.tokens, merged.parents) == ([7, 1, 2, 3, 4], [-1, 0, 1, 1, 0])
    assert root_paths(merged) == root_paths(chain) | root_paths(other)       # nothing lost, nothing twice
    assert len(merged) == len(root_paths(merged))
    small = merge([chain, other], 3)                                         # the first tree's nodes come first
    assert (small.tokens, small.parents) == ([7, 1, 2], [-1, 0, 1])
    rng = random.Random(0)
    for _ in range(50):                                                       # random trees: the same paths
        trees = []
        for _ in range(3):
            parents = [-1] + [rng.randrange(i) for i in range(1, rng.randrange(1, 9))]
            trees.append(Tree([5] + [rng.randrange(4) for _ in parents[1:]], parents))
        assert root_paths(merge(trees, 100)) == set().union(*map(root_paths, trees))
    with pytest.raises(ValueError, match="one root"):
        merge([chain, Tree.chain(8, [1])], 5)


def test_merged_drafter_is_lossless(tiny_model):
    prompt = torch.tensor([[5, 17, 33, 2, 9, 5, 17]])
    plain = generate(tiny_model, prompt, 30, eos_token_id=None)
    drafter = MergedDrafter(NgramDrafter(), TokenRecycling(512, k=4, template=Template.budget(3, 2)))
    assert drafter.default_len == len(Template.budget(3, 2)) - 1
    assert decode(tiny_model, prompt, 30, drafter, eos_token_id=None).tokens == plain[0, 7:].tolist()
    assert torch.equal(generate(tiny_model, prompt, 30, tree="lookup+recycling", eos_token_id=None), plain)
    sampled = MergedDrafter(ModelDrafter(tiny_model), TokenRecycling(512, k=4))
    with pytest.raises(ValueError, match="not sampled"):
        decode(tiny_model, prompt, 8, sampled, temperature=0.8, seed=0)
