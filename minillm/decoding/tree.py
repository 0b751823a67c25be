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
Several drafters' guesses fit in one tree (SpecInfer's merged token tree): `merge` lays their root
paths over one another, sharing a node where two guess the same token after the same path;
`MergedDrafter(NgramDrafter(), TokenRecycling(V))` drafts prompt lookup's chain and the recycled tree together.

Drafters (here, medusa.py and drafters.py) all answer one call, `propose(context, k, hidden, ...)
-> Tree`: a chain drafter returns a chain (parents [-1, 0, 1, ...]), a tree drafter a tree. The
decoding loop (loop.py) scores any proposal with `score`, accepts with `accept_greedy`
(any tree) or, when sampling, speculative.accept_chain (chains) / `accept_typical` (trees), and
rolls the cache back to the accepted path.

Not handled: batch > 1 (trees of different accepted lengths would need ragged caches),
sampling-exact (rejection-sampling) tree verification; typical acceptance is Medusa's
approximation, not distribution-preserving.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ..native.logits import argmax, topk_lse
from .sampling import probs_from_logits


# ----------------------------------------------------------------------------- the tree itself
@dataclass
class Tree:
    tokens: list[int]   # tokens[0] is the root
    parents: list[int]  # parents[0] == -1, parents[i] < i (so any prefix of the nodes is a tree)
    q: torch.Tensor | None = None  # chains drafted by sampling: (len - 1, V) distributions the drafts came from

    def __post_init__(self):
        check_parents(self.parents)
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"tree has {len(self.tokens)} tokens but {len(self.parents)} parents")

    @classmethod
    def chain(cls, root: int, drafts, q=None) -> Tree:
        """root -> d_1 -> d_2 ...: what a chain drafter proposes. [7], [3, 4] -> tokens [7, 3, 4], parents [-1, 0, 1]."""
        drafts = [int(t) for t in drafts]
        return cls([int(root)] + drafts, list(range(-1, len(drafts))), q)

    def is_chain(self) -> bool:
        return self.parents == list(range(-1, len(self.parents) - 1))

    def __len__(self):
        return len(self.parents)

    def prefix(self, n: int) -> Tree:
        return Tree(self.tokens[:n], self.parents[:n], None if self.q is None else self.q[:max(n - 1, 0)])


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
    tokens (1, N), positions (1, N) = prefix_len + depth, mask (1, 1, N, prefix_len + N).
    A chain needs neither: its positions follow the cache and its mask is the causal one, which
    the model builds itself (positions and mask are then None)."""
    N = len(tree)
    if tree.is_chain():
        return torch.tensor([tree.tokens], device=device), None, None
    tokens = torch.tensor([tree.tokens], device=device)
    positions = (prefix_len + depths(tree.parents)).to(device)[None]
    mask = torch.ones(N, prefix_len + N, dtype=torch.bool, device=device)  # the whole prefix is visible
    mask[:, prefix_len:] = tree_mask(tree.parents).to(device)
    return tokens, positions, mask[None, None]


def score(model, cache, tree: Tree):
    """The verification forward: one pass over all nodes -> logits (N, V) and final hidden states
    (N, dim). Appends N cache slots (the caller keeps the accepted ones). Plain decoding is a tree of one node."""
    tokens, positions, mask = verification_inputs(tree, cache.length, next(model.parameters()).device)
    logits, hidden = model(tokens, positions=positions, mask=mask, cache=cache, return_hidden=True)
    return logits[0], hidden[0]


# ----------------------------------------------------------------------------- acceptance
def _deepest_path(parents, ok) -> list[int]:
    """ok: N bools, one per node, 'my token is acceptable after my parent'; the root always is.
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
    choice = argmax(logits).tolist()                             # (N,) the model's pick after each node
    ok = [True] + [tree.tokens[i] == choice[tree.parents[i]] for i in range(1, len(tree))]
    path = _deepest_path(tree.parents, ok)
    return path, choice[path[-1]]


def accept_typical(tree: Tree, logits, temperature: float = 0.7, posterior_threshold: float = 0.09,
                   posterior_alpha: float = 0.3, generator=None, top_k=None, top_p=None):
    """Medusa's typical acceptance: token x after a node is accepted if
    p(x) > min(posterior_threshold, posterior_alpha * exp(-entropy(p))), p = softmax(logits / temperature).
    Confident distributions demand the likely token; flat ones accept more. Not exact sampling.
    The next token is sampled from the last accepted node's distribution (top_k / top_p applied)."""
    if temperature <= 0:
        raise ValueError(f"typical acceptance needs temperature > 0, got {temperature}; use greedy for 0")
    probs = probs_from_logits(logits, temperature, top_k, top_p)                # (N, V)
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
    def from_paths(cls, paths) -> Template:
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
    def budget(cls, depth: int, budget: int) -> Template:
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
    Warm start: the matrix can outlive one request (the paper keeps it from query to query);
    `warm_up(model, ids)` fills it from any text first, `copy()` hands each request its own copy.
    Dynamic trees (`dynamic=True`): the matrix also keeps each guess's probability, and `propose` grows the
    tree best first, each new node the candidate whose path (its guesses' probabilities multiplied) is the
    likeliest, as EAGLE-2 does with its draft model's scores: deep where the guesses are confident, wide where
    they are not, instead of the static template's fixed shape (`dynamic_tree_ref` is the slow reference).
    Two-token keys (`dynamic=True, context=2`, not in the paper): every verified node's top-k is also kept
    under the pair (its parent's token, its token) -- for the root, (the token before it, the root) -- and a
    tree's node reads its pair's guesses where that pair was seen, its token's row otherwise (backing off as
    an n-gram model does): "of" after "because" and "of" after "one" get guesses of their own. The pairs are
    a dict that grows by at most one entry per verified node (`nbytes()` counts them as packed arrays).
    """

    def __init__(self, vocab_size: int, k: int = 8, template: Template | None = None, dynamic: bool = False,
                 context: int = 1):
        self.k = k
        self.adjacency = torch.zeros(vocab_size, k, dtype=torch.int32)
        self.template = template or Template.budget(depth=3, budget=1)
        if max(self.template.choices) >= k:
            raise ValueError(f"template asks for choice {max(self.template.choices)} but only top-{k} is stored")
        if context not in (1, 2) or isinstance(context, bool):
            raise ValueError(f"Token Recycling keys its guesses by the last 1 or 2 tokens, not context={context!r}")
        if context == 2 and not dynamic:
            raise ValueError("two-token keys (context=2) need dynamic=True: the static template reads one row "
                             "per token")
        self.probs = torch.zeros(vocab_size, k) if dynamic else None    # the model's probability of each guess
        self.context = context
        self.pairs: dict | None = {} if context == 2 else None   # (previous token, token) -> (guesses, probs)
        self._proposed = None           # (tokens, parents, token before the root) of the last proposal

    @property
    def dynamic(self) -> bool:
        return self.probs is not None

    def nbytes(self) -> int:
        pairs = len(self.pairs) * (8 + self.k * (4 + 4)) if self.pairs is not None else 0
        return pairs + sum(t.numel() * t.element_size() for t in (self.adjacency, self.probs) if t is not None)

    def update(self, tokens, logits, parents=None, before: int | None = None):
        """tokens (N,) each followed by logits (N, V): remember the top-k after each token. A token that occurs
        more than once keeps its last occurrence's (as if the rows were written one after another).
        Two-token keys: node i's top-k also goes under (tokens[parents[i]], tokens[i]); parents default to a
        chain, and the first node's previous token is `before` (None: the first node gets no pair)."""
        tokens = torch.as_tensor(tokens).reshape(-1).tolist()
        n = len(tokens)
        values, indices, lse = topk_lse(logits.reshape(n, -1), self.k, lse=self.dynamic)   # native/logits.py's kernel
        indices = indices.to(torch.int32).cpu()
        probs = (values - lse[:, None]).exp().cpu() if self.dynamic else None   # softmax of the top-k only
        if self.pairs is not None:                    # every node's top-k under (its parent's token, its token)
            parents = range(-1, n - 1) if parents is None else parents
            guesses, chances = indices.tolist(), probs.tolist()
            for i, (token, parent) in enumerate(zip(tokens, parents)):
                previous = tokens[parent] if parent >= 0 else before
                if previous is not None:
                    self.pairs[(previous, token)] = (guesses[i], chances[i])
        last = {token: i for i, token in enumerate(tokens)}   # each distinct token -> its last occurrence
        keep = torch.tensor(list(last.values()))
        distinct = torch.tensor(list(last))
        self.adjacency[distinct] = indices[keep]
        if probs is not None:
            self.probs[distinct] = probs[keep]

    def warm_up(self, model, ids, chunk: int = 512) -> TokenRecycling:
        """Fill the matrix from a text before decoding: `ids` (1-D token ids) go through the model `chunk`
        tokens at a time (each chunk a context of its own, no cache), and every token's row gets the top-k
        the model predicted after it, as if decoding had produced that text. One prefill's cost, once."""
        ids = torch.as_tensor(ids).reshape(-1)
        if chunk < 1 or len(ids) == 0:
            raise ValueError(f"warm_up needs token ids and chunk >= 1, got {len(ids)} ids and chunk={chunk}")
        device = next(model.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(ids), chunk):
                piece = ids[start:start + chunk]
                self.update(piece, model(piece[None].to(device))[0])
        return self

    def copy(self) -> TokenRecycling:
        """A drafter with the same template and its own copy of the matrix (a warm start for one request)."""
        twin = TokenRecycling(len(self.adjacency), self.k, self.template, self.dynamic, self.context)
        twin.adjacency.copy_(self.adjacency)
        if self.dynamic:
            twin.probs.copy_(self.probs)
        if self.pairs is not None:
            twin.pairs = dict(self.pairs)             # values are replaced, never changed in place
        return twin

    @property
    def default_len(self) -> int:
        return len(self.template) - 1

    def propose(self, context, k, hidden=None, **sampling) -> Tree:
        """The template filled from the adjacency matrix, rooted at the last token; at most k nodes past the root.
        Dynamic: the k likeliest paths' nodes, grown best first (see the class docstring)."""
        if self.dynamic:
            before = context[-2] if len(context) > 1 else None
            tree = dynamic_tree(context[-1], self.adjacency, self.probs, k, self.pairs, before)
            self._proposed = (tree.tokens, tree.parents, before)
            return tree
        return self.template.fill(context[-1], lambda token, depth: self.adjacency[token].tolist()).prefix(k + 1)

    def observe(self, tree: Tree, logits, hidden=None):
        before = None                                 # the root's previous token: known for its own proposal
        if self._proposed is not None:
            tokens, parents, previous = self._proposed
            if tree.tokens == tokens[:len(tree)] and tree.parents == parents[:len(tree)]:
                before = previous
        self.update(tree.tokens, logits, tree.parents, before)


def dynamic_tree(root: int, adjacency, probs, size: int, pairs: dict | None = None,
                 before: int | None = None) -> Tree:
    """A tree of `size` nodes past the root, grown best first: every node's children are its token's guesses
    (adjacency row), a path's score is the product of its guesses' probabilities, and each step adds the
    best-scoring candidate whose parent is in the tree (a heap; ties go to the candidate found first).
    With `pairs` ((previous token, token) -> (guesses, probs)), a node whose pair is there takes those guesses
    instead; the root's previous token is `before`."""
    tokens, parents, heap, found = [int(root)], [-1], [], 0

    def offer(node: int, score: float):
        nonlocal found
        token = tokens[node]
        previous = tokens[parents[node]] if node else before
        row = pairs.get((previous, token)) if pairs else None
        for guess, p in zip(*(row or (adjacency[token].tolist(), probs[token].tolist()))):
            heapq.heappush(heap, (-score * p, found, node, guess))
            found += 1

    offer(0, 1.0)
    while len(tokens) <= size and heap:
        negative, _, parent, guess = heapq.heappop(heap)
        tokens.append(guess)
        parents.append(parent)
        offer(len(tokens) - 1, -negative)
    return Tree(tokens, parents)


def dynamic_tree_ref(root: int, adjacency, probs, size: int, pairs: dict | None = None,
                     before: int | None = None) -> set[tuple[int, ...]]:
    """The slow reference: every path of up to `size` guesses enumerated and scored (k^size of them: for small
    k and size only), the `size` best kept (a path's score never beats its prefix's, so the best ones include
    their prefixes). Returns the chosen nodes as paths of choice indices from the root (into the pair's
    guesses where `pairs` has the node's pair, into its token's row otherwise)."""
    def guesses(previous, token):
        if pairs and (previous, token) in pairs:
            return list(zip(*pairs[(previous, token)]))
        return [(int(adjacency[token][c]), float(probs[token][c])) for c in range(adjacency.shape[1])]

    scored, frontier = [], [((), before, int(root), 1.0)]
    for _ in range(size):
        frontier = [(path + (c,), token, guess, score * p) for path, previous, token, score in frontier
                    for c, (guess, p) in enumerate(guesses(previous, token))]
        scored += [(score, path) for path, _, _, score in frontier]
    return {path for _, path in sorted(scored, key=lambda sp: -sp[0])[:size]}


# ----------------------------------------------------------------------------- merged trees
def merge(trees, size: int) -> Tree:
    """One tree from several rooted at the same token: every tree's root paths laid over one another, a node
    shared where two trees guess the same token after the same path. Trees are taken in the order given,
    each in its own node order, until `size` nodes (a node whose parent did not fit is dropped too).
    [r, a, b] (a chain) with [r, a, c] -> tokens [r, a, b, c], parents [-1, 0, 1, 1]."""
    if not trees or size < 1:
        raise ValueError(f"merge needs at least one tree and size >= 1, got {len(trees)} trees and size={size}")
    root = trees[0].tokens[0]
    if any(t.tokens[0] != root for t in trees):
        raise ValueError(f"merge needs trees with one root, got roots {[t.tokens[0] for t in trees]}")
    tokens, parents, node_of = [root], [-1], {}             # node_of[(parent node, token)] = merged node
    for tree in trees:
        mine = {0: 0}                                          # this tree's node -> merged node
        for i in range(1, len(tree)):
            parent = mine.get(tree.parents[i])
            if parent is None:                                 # its parent did not fit
                continue
            key = (parent, tree.tokens[i])
            if key not in node_of:
                if len(tokens) == size:
                    continue
                node_of[key] = len(tokens)
                tokens.append(tree.tokens[i])
                parents.append(parent)
            mine[i] = node_of[key]
    return Tree(tokens, parents)


class MergedDrafter:
    """Several drafters as one: each proposes, `merge` joins their trees (the first drafter's nodes first)
    within the k + 1 nodes a forward verifies, and every drafter observes the verified tree. Only drafts
    that are not sampled can be merged (a sampled chain's acceptance needs its own distribution)."""

    def __init__(self, *drafters):
        if not drafters:
            raise ValueError("MergedDrafter needs at least one drafter")
        self.drafters = drafters
        self.default_len = max(getattr(d, "default_len", None) or 4 for d in drafters)   # decode's default k

    def propose(self, context, k, hidden=None, **sampling) -> Tree:
        trees = [d.propose(context, k, hidden, **sampling) for d in self.drafters]
        for d, tree in zip(self.drafters, trees):
            if tree.q is not None:
                raise ValueError(f"MergedDrafter merges drafts that are not sampled; {type(d).__name__} sampled "
                                 f"its chain (temperature > 0): use it alone")
        return merge(trees, k + 1)

    def observe(self, tree: Tree, logits, hidden=None):
        for d in self.drafters:
            d.observe(tree, logits, hidden)
