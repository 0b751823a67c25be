"""Tree attention: verify a whole tree of guessed continuations in one forward pass.

A chain drafter (chapter 5) guesses one token per position; when its first guess is wrong the
rest is wasted. A tree guesses several tokens per position and shares prefixes: the verifier
runs every node at once, each node attending to the cached prefix and to its own ancestors only.

    tree as parent pointers    tokens [a, b, c, d]   parents [-1, 0, 0, 1]      a
    (node 0 = the root: the     depths [0, 1, 1, 2]   -> positions = prefix + depth   / \\
    last chosen token, not yet  tree mask: node i sees the prefix and {i} + ancestors(i)  b   c
    in the cache)                                                                    |
                                                                                     d
Verification reads the model's choice at every node; the accepted path is the deepest node
whose every token on the way down matches the choice at its parent (greedy), or is likely
enough under it (Medusa's typical acceptance). The accepted nodes' K/V are gathered into
contiguous cache slots and everything else is dropped (`StaticCache.keep`).

Drafters fill a static tree *template* (Medusa's notation: a node is the path of choice
indices leading to it, (0, 1) = "second guess after the first guess"):
    TokenRecycling  choice i at a node = i-th of the top-k tokens the model last produced after
                    that node's token (an adjacency matrix updated from every verification).
    MedusaDrafter   (medusa.py) choice i at depth d = i-th most likely token of Medusa head d.

Not handled: batch > 1 (trees of different accepted lengths would need ragged caches),
sampling-exact (rejection-sampling) tree verification; typical acceptance is Medusa's
approximation, not distribution-preserving.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


# ----------------------------------------------------------------------------- the tree itself
@dataclass
class Tree:
    tokens: list[int]   # tokens[0] is the root
    parents: list[int]  # parents[0] == -1, parents[i] < i (so any prefix of the nodes is a tree)

    def __post_init__(self):
        check_parents(self.parents)
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"tree has {len(self.tokens)} tokens but {len(self.parents)} parents")

    def __len__(self):
        return len(self.parents)

    def prefix(self, n: int) -> "Tree":
        return Tree(self.tokens[:n], self.parents[:n])


def check_parents(parents):
    if len(parents) == 0 or parents[0] != -1:
        raise ValueError(f"node 0 must be the root with parent -1, got parents {list(parents)[:8]}")
    for i, p in enumerate(parents[1:], start=1):
        if not 0 <= p < i:
            raise ValueError(f"node {i} has parent {p}; expected a parent in [0, {i}) (nodes in BFS/topological order)")


def path_to(parents, node: int) -> list[int]:
    """Node indices from the root down to `node`: parents [-1, 0, 0, 1], node 3 -> [0, 1, 3]."""
    path = [node]
    while parents[path[-1]] != -1:
        path.append(parents[path[-1]])
    return path[::-1]


def depths(parents) -> torch.Tensor:
    """Depth of every node (root 0): [-1, 0, 0, 1] -> [0, 1, 1, 2]."""
    d = [0] * len(parents)
    for i in range(1, len(parents)):
        d[i] = d[parents[i]] + 1
    return torch.tensor(d)


def tree_mask_ref(parents) -> torch.Tensor:
    """(N, N) bool, [i, j] True iff j is i or an ancestor of i. Walks up from each node."""
    N = len(parents)
    mask = torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        mask[i, path_to(parents, i)] = True
    return mask


def tree_mask(parents) -> torch.Tensor:
    """Same as tree_mask_ref, one row-gather per node: row i = row parent(i) plus i itself."""
    check_parents(parents)
    N = len(parents)
    mask = torch.eye(N, dtype=torch.bool)
    for i in range(1, N):  # parents come first, so their rows are complete
        mask[i] |= mask[parents[i]]
    return mask


def verification_inputs(tree: Tree, prefix_len: int, device="cpu"):
    """What the model needs to score the tree after `prefix_len` cached tokens:
    tokens (1, N), positions (1, N) = prefix_len + depth, mask (1, 1, N, prefix_len + N)."""
    N = len(tree)
    tokens = torch.tensor([tree.tokens], device=device)
    positions = (prefix_len + depths(tree.parents)).to(device)[None]
    mask = torch.ones(N, prefix_len + N, dtype=torch.bool, device=device)  # the whole prefix is visible
    mask[:, prefix_len:] = tree_mask(tree.parents).to(device)
    return tokens, positions, mask[None, None]


def verify(model, cache, tree: Tree):
    """One forward over all nodes: logits (N, V) and final hidden states (N, dim). Appends N cache slots."""
    tokens, positions, mask = verification_inputs(tree, cache.length, next(model.parameters()).device)
    logits, hidden = model(tokens, positions=positions, mask=mask, cache=cache, return_hidden=True)
    return logits[0], hidden[0]


# ----------------------------------------------------------------------------- acceptance
def _deepest_path(parents, ok: torch.Tensor) -> list[int]:
    """ok (N,) bool per node 'my token is acceptable after my parent'; the root always is.
    Returns the longest root path of acceptable nodes (the first of equal depth)."""
    accepted = [True] * len(parents)
    best, best_depth, depth = 0, 0, [0] * len(parents)
    for i in range(1, len(parents)):
        accepted[i] = accepted[parents[i]] and bool(ok[i])
        depth[i] = depth[parents[i]] + 1
        if accepted[i] and depth[i] > best_depth:
            best, best_depth = i, depth[i]
    return path_to(parents, best)


def accept_greedy(tree: Tree, logits):
    """Greedy verification: keep the longest path on which every token is the model's argmax at its parent.
    Returns (accepted node indices from the root, next token = argmax at the last accepted node)."""
    choice = logits.argmax(-1)                                   # (N,) the model's pick after each node
    parents = torch.tensor(tree.parents)
    ok = torch.tensor(tree.tokens) == choice[parents.clamp(min=0)]
    path = _deepest_path(tree.parents, ok)
    return path, int(choice[path[-1]])


def accept_typical(tree: Tree, logits, temperature: float = 0.7, posterior_threshold: float = 0.09,
                   posterior_alpha: float = 0.3, generator=None):
    """Medusa's typical acceptance: token x after a node is accepted if
    p(x) > min(posterior_threshold, posterior_alpha * exp(-entropy(p))), p = softmax(logits / temperature).
    Confident distributions demand the likely token; flat ones accept more. Not exact sampling.
    The next token is sampled from the last accepted node's distribution."""
    if temperature <= 0:
        raise ValueError(f"typical acceptance needs temperature > 0, got {temperature}; use greedy for 0")
    probs = torch.softmax(logits.float() / temperature, dim=-1)                # (N, V)
    entropy = -(probs * torch.log(probs.clamp(min=1e-30))).sum(-1)              # (N,)
    threshold = torch.minimum(torch.full_like(entropy, posterior_threshold), posterior_alpha * torch.exp(-entropy))
    parents = torch.tensor(tree.parents).clamp(min=0)
    p_token = probs[parents, torch.tensor(tree.tokens)]                         # p(token | parent's context)
    path = _deepest_path(tree.parents, p_token > threshold[parents])
    return path, int(torch.multinomial(probs[path[-1]], 1, generator=generator))


# ----------------------------------------------------------------------------- static templates
@dataclass
class Template:
    """A static tree shape: node i is reached by choice index `choices[i]` at its parent. Node 0 = root."""
    parents: list[int]
    choices: list[int]

    @classmethod
    def from_paths(cls, paths) -> "Template":
        """Medusa notation, e.g. [(0,), (1,), (0, 0)] -> root, two children of the root, one grandchild."""
        paths = sorted({tuple(p) for p in paths if len(p)}, key=lambda p: (len(p), p))
        index = {(): 0}
        parents, choices = [-1], [0]
        for p in paths:
            if p[:-1] not in index:
                raise ValueError(f"path {p} has no parent path {p[:-1]} in the template")
            index[p] = len(parents)
            parents.append(index[p[:-1]])
            choices.append(p[-1])
        return cls(parents, choices)

    @classmethod
    def budget(cls, depth: int, budget: int) -> "Template":
        """All paths up to `depth` whose choice indices add up to at most `budget`:
        budget 0 is a chain, each extra unit adds a second-best guess somewhere."""
        paths, frontier = [], [()]
        for _ in range(depth):
            frontier = [p + (c,) for p in frontier for c in range(budget + 1) if sum(p) + c <= budget]
            paths += frontier
        return cls.from_paths(paths)

    def __len__(self):
        return len(self.parents)

    def depth(self) -> int:
        return int(depths(self.parents).max())

    def fill(self, root: int, candidates) -> Tree:
        """BFS: node i's token = candidates(parent token, depth)[choice]; `candidates` returns a list."""
        tokens, d = [root], [0]
        for i in range(1, len(self.parents)):
            p = self.parents[i]
            d.append(d[p] + 1)
            tokens.append(int(candidates(tokens[p], d[i] - 1)[self.choices[i]]))
        return Tree(tokens, list(self.parents))


# ----------------------------------------------------------------------------- Token Recycling
class TokenRecycling:
    """Train-free drafter: adjacency[t] = the top-k tokens the model most recently predicted after token t.

    State: vocab_size x k int32 = 49152 x 8 x 4 bytes = 1.5 MiB for SmolLM2 (`nbytes()`).
    Rows start at token 0 (a harmless wrong guess) until the model has produced logits after t.
    Every verification writes the top-k of *every* tree node's logits, accepted or not: the
    rejected branches are the "trash" turned into next step's guesses.
    """

    def __init__(self, vocab_size: int, k: int = 8, template: Template | None = None):
        self.k = k
        self.adjacency = torch.zeros(vocab_size, k, dtype=torch.int32)
        self.template = template or Template.budget(depth=3, budget=1)
        if max(self.template.choices) >= k:
            raise ValueError(f"template asks for choice {max(self.template.choices)} but only top-{k} is stored")

    def nbytes(self) -> int:
        return self.adjacency.numel() * self.adjacency.element_size()

    def update(self, tokens, logits):
        """tokens (N,) each followed by logits (N, V): remember the top-k after each token."""
        tokens = torch.as_tensor(tokens).reshape(-1)
        self.adjacency[tokens] = logits.reshape(len(tokens), -1).topk(self.k, dim=-1).indices.to(torch.int32)

    def draft(self, root: int, hidden=None) -> Tree:
        return self.template.fill(root, lambda token, depth: self.adjacency[token].tolist())

    def observe(self, tree: Tree, logits, hidden=None):
        self.update(tree.tokens, logits)


# ----------------------------------------------------------------------------- the decoding loop
@torch.inference_mode()
def tree_steps(model, ids, max_new_tokens: int, drafter, eos_token_id="config", acceptance: str = "greedy",
               temperature: float = 0.7, seed: int | None = None, stats: dict | None = None):
    """Prompt (1, T) -> yields, per forward, the list of new tokens it produced (accepted drafts + one).

    Each step drafts a tree from the last token, verifies it in one forward, keeps the accepted
    nodes' cache entries. With greedy acceptance the tokens equal plain greedy decoding. `stats`,
    if given, counts forwards (verification forwards, prefill excluded) and new_tokens.
    """
    from .generate import check_input_ids
    from .kv_cache import StaticCache

    config = model.config
    ids = check_input_ids(ids, config, max_new_tokens)
    if ids.shape[0] != 1:
        raise ValueError(f"tree decoding handles one sequence at a time, got batch {ids.shape[0]}")
    if acceptance not in ("greedy", "typical"):
        raise ValueError(f"acceptance must be 'greedy' or 'typical', got {acceptance!r}")
    if eos_token_id == "config":
        eos_token_id = config.eos_token_id
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    stats = {} if stats is None else stats
    stats.update(forwards=0, new_tokens=0)
    T = ids.shape[1]
    param = next(model.parameters())
    cache = StaticCache(config, 1, min(config.max_seq_len, T + max_new_tokens + len(drafter.template)),
                        dtype=param.dtype, device=param.device)
    logits, hidden = model(ids, cache=cache, return_hidden=True)
    drafter.observe(Tree(ids[0].tolist(), [-1] + list(range(T - 1))), logits[0], hidden[0])
    chunk, last_hidden = [int(logits[0, -1].argmax())], hidden[0, -1]
    while True:
        chunk = chunk[:max_new_tokens - stats["new_tokens"]]
        if eos_token_id in chunk:
            chunk = chunk[:chunk.index(eos_token_id) + 1]
        stats["new_tokens"] += len(chunk)
        yield chunk
        if stats["new_tokens"] == max_new_tokens or chunk[-1] == eos_token_id:
            return
        tree = drafter.draft(chunk[-1], last_hidden)
        tree = tree.prefix(min(len(tree), cache.max_len - cache.length))  # never overflow near the end
        start = cache.length
        logits, hidden = verify(model, cache, tree)
        stats["forwards"] += 1
        if acceptance == "greedy":
            path, next_token = accept_greedy(tree, logits)
        else:
            path, next_token = accept_typical(tree, logits, temperature, generator=generator)
        cache.keep(start, [start + i for i in path])
        drafter.observe(tree, logits, hidden)
        chunk, last_hidden = [tree.tokens[i] for i in path[1:]] + [next_token], hidden[path[-1]]


def tree_generate(model, ids, max_new_tokens: int, drafter, **kwargs) -> torch.Tensor:
    """Prompt (1, T) -> prompt + new tokens (1, T + n). Keyword arguments: those of tree_steps."""
    new = [t for chunk in tree_steps(model, ids, max_new_tokens, drafter, **kwargs) for t in chunk]
    return torch.cat([ids.long(), torch.tensor([new], device=ids.device)], dim=1)


def tree_stream(model, ids, max_new_tokens: int, temperature: float = 0.0, top_k=None, top_p=None,
                seed: int | None = None, eos_token_id="config", cache: str = "static", tree: str = "recycling"):
    """generate.stream's signature and output ((1,) tensors), decoding with a tree drafter by name.
    temperature 0: greedy acceptance (exactly plain greedy); > 0: Medusa's typical acceptance."""
    if top_k is not None or top_p is not None:
        raise ValueError(f"tree decoding takes temperature only, got top_k={top_k}, top_p={top_p}")
    if cache != "static":
        raise ValueError(f"tree decoding keeps its own StaticCache; got cache={cache!r}")
    drafter = make_tree_drafter(tree, model)
    acceptance = "typical" if temperature > 0 else "greedy"
    for chunk in tree_steps(model, ids, max_new_tokens, drafter, eos_token_id, acceptance, temperature, seed):
        for token in chunk:
            yield torch.tensor([token], device=ids.device)


def make_tree_drafter(name: str, model):
    """"recycling" -> TokenRecycling, "medusa" -> SmolLM2's committed Medusa heads (data/)."""
    if name == "recycling":
        return TokenRecycling(model.config.vocab_size)
    if name == "medusa":
        from .medusa import default_medusa_drafter

        return default_medusa_drafter(model)
    raise ValueError(f"tree must be 'recycling' or 'medusa', got {name!r}")
