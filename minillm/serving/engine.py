"""The serving engine: many requests, each with its own sampling settings, decoded over one KV pool.

    engine = Engine(model, tokenizer)                       # continuous batching, chunked prefill
    a = engine.add(prompt_ids, max_tokens=32)                # any time, also while others decode
    b = engine.add(other_ids, max_tokens=8, temperature=0.7, seed=1, stop=["\\n"])
    engine.run()                                             # or engine.step() from a server's loop
    a.output, b.text, b.finish_reason, engine.stats

Each step asks the scheduler (scheduler.py) which tokens run, runs them as one packed forward over
the paged pool (blocks.py), then samples a token for every request whose sequence was computed to
its end, each from its own generator, and stops it at EOS, max_tokens or a stop string.
The promise, tested: a request's greedy output is the output of `generate` on it alone, whatever
the other requests, the budget, the chunk sizes and the preemptions (float32: equal tokens; in
bfloat16 the batch changes the matmul blocking, so near-ties may flip: equal up to the first such tie).
Not handled: speculative or tree decoding inside the engine; compiled (fixed-shape) steps.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from ..decoding.loop import check_stop, visible_text
from ..decoding.sampling import check_input_ids, check_sampling, sample_next
from .blocks import BlockManager, packed_forward
from .scheduler import Scheduler


class QueueFull(RuntimeError):
    """The engine's queue holds max_waiting requests already (a server answers 429)."""


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False                              # benchmarks: always make max_tokens tokens
    id: int = 0
    output: list[int] = field(default_factory=list)       # new tokens, EOS included if reached
    finish_reason: str | None = None                      # "stop" (EOS or a stop string), "length", "abort"
    text: str = ""                                        # the output's text, once finished (needs a tokenizer)
    handle: int | None = None                             # its sequence in the KV pool while running
    computed: int = 0                                     # tokens of `sequence` in the KV cache
    preemptions: int = 0
    arrival: float = 0.0
    token_times: list[float] = field(default_factory=list)  # time.perf_counter() at each new token
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.output

    @property
    def left_to_compute(self) -> int:
        return len(self.prompt) + len(self.output) - self.computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first token."""
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


class Engine:
    def __init__(self, model, tokenizer=None, num_blocks: int | None = None, block_size: int = 16,
                 max_batch_tokens: int = 64, max_seqs: int = 8, policy: str = "continuous",
                 prefix_caching: bool = True, max_waiting: int = 256, prefill_chunk: int | None = None):
        """num_blocks: KV pool size (default: room for max_seqs full contexts of 1024 tokens).
        max_batch_tokens: tokens per step (a prompt's chunk is what the decodes leave of it, at most
            prefill_chunk tokens per prompt if given).
        max_waiting: requests queued before add() raises QueueFull."""
        param = next(model.parameters())
        self.model, self.tokenizer, self.max_waiting = model, tokenizer, max_waiting
        self.scheduler = Scheduler(None, policy, max_batch_tokens, max_seqs, prefill_chunk)  # checks its settings
        num_blocks = num_blocks if num_blocks is not None else max_seqs * 1024 // block_size
        self.blocks = BlockManager(model.config, num_blocks, block_size, param.dtype, param.device, prefix_caching)
        self.scheduler.blocks = self.blocks
        self.ids = itertools.count()
        self.trace: list[list[tuple[int, str, int]]] = []  # per step: (request id, "prefill" | "decode", tokens)
        self.stats = {"steps": 0, "tokens_computed": 0, "prefill_tokens": 0, "decode_tokens": 0,
                      "preemptions": 0, "finished": 0, "aborted": 0, "peak_blocks": 0}

    # -- requests ---------------------------------------------------------------------------
    def add(self, prompt, max_tokens: int = 64, temperature: float = 0.0, top_k=None, top_p=None,
            seed: int | None = None, stop=None, ignore_eos: bool = False) -> Request:
        """Queue a request (prompt: token ids) and return it; its fields fill in as the engine steps."""
        if not isinstance(prompt, torch.Tensor):
            try:
                prompt = torch.as_tensor(prompt)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"a request takes one prompt, a flat list of token ids; "
                                 f"got {str(prompt)[:60]}") from None
        if prompt.dim() > 1 and prompt.shape[0] != 1 or prompt.dim() > 2:
            raise ValueError(f"a request takes one prompt (token ids of shape (T,)); got shape {tuple(prompt.shape)}")
        ids = check_input_ids(prompt.reshape(1, -1), self.model.config, max_tokens)
        check_sampling(temperature, top_k, top_p)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        stop = check_stop(stop)
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer: Engine(model, tokenizer)")
        blocks = -(-(ids.shape[1] + max_tokens) // self.blocks.block_size)
        if blocks > self.blocks.allocator.num_blocks:
            raise ValueError(f"prompt ({ids.shape[1]} tokens) + max_tokens ({max_tokens}) needs {blocks} KV blocks; "
                             f"the pool has {self.blocks.allocator.num_blocks}")
        if len(self.scheduler.waiting) >= self.max_waiting:
            raise QueueFull(f"the queue is full ({self.max_waiting} requests wait already); try again later")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        request = Request(ids[0].tolist(), max_tokens, temperature, top_k, top_p, seed, stop, bool(ignore_eos),
                          next(self.ids), arrival=time.perf_counter(), generator=generator)
        self.scheduler.waiting.append(request)
        return request

    def abort(self, request: Request) -> None:
        """Stop a request now (a client that went away): its blocks go back to the pool at once."""
        if not request.finished:
            self._finish(request, "abort")
            self.stats["aborted"] += 1

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one forward; return the requests that got a new token (finished ones included)."""
        plan = self.scheduler.plan()
        self.stats["preemptions"] += len(plan.preempted)
        if not plan.requests:
            if self.scheduler.waiting and not self.scheduler.running:  # add() rules this out; say so if not
                raise RuntimeError("the scheduler could place no request although the pool is empty")
            return []
        self.blocks.make_room(plan.blocks)
        chunks = [r.sequence[r.computed:r.computed + n] for r, n in zip(plan.requests, plan.counts)]
        self.trace.append([(r.id, "decode" if r.output and n == 1 and r.computed == len(r.sequence) - 1
                            else "prefill", n) for r, n in zip(plan.requests, plan.counts)])
        logits = packed_forward(self.model, self.blocks.cache, [r.handle for r in plan.requests], chunks)
        now, touched = time.perf_counter(), []
        for i, (request, n) in enumerate(zip(plan.requests, plan.counts)):
            kind = self.trace[-1][i][1]
            self.stats[f"{kind}_tokens"] += n
            request.computed += n
            if request.left_to_compute:                           # a prompt chunk: more to prefill
                continue
            token = int(sample_next(logits[i:i + 1].float(), request.temperature, request.top_k, request.top_p,
                                    request.generator))
            request.output.append(token)
            request.token_times.append(now)
            touched.append(request)
            self._check_stop(request)
        bs = self.blocks.block_size
        for request, n in zip(plan.requests, plan.counts):       # blocks filled this step become shareable
            if request.handle is not None and request.computed // bs > (request.computed - n) // bs:
                self.blocks.register(request.handle, request.sequence)
        self.stats["steps"] += 1
        self.stats["tokens_computed"] += plan.tokens
        self.stats["peak_blocks"] = max(self.stats["peak_blocks"], self.blocks.allocator.num_used)
        return touched

    def _check_stop(self, request: Request) -> None:
        eos = self.model.config.eos_token_id
        if eos is not None and request.output[-1] == eos and not request.ignore_eos:
            self._finish(request, "stop")
        elif request.stop and any(s in self.decode(request.output) for s in request.stop):
            self._finish(request, "stop")
        elif len(request.output) >= request.max_tokens:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        self.scheduler.finish(request)
        self.stats["finished"] += reason != "abort"
        if self.tokenizer is not None:
            request.text = self.visible_text(request)

    def run(self) -> None:
        while self.has_work:
            self.step()

    # -- text -------------------------------------------------------------------------------
    def decode(self, tokens: list[int]) -> str:
        eos = self.model.config.eos_token_id
        return self.tokenizer.decode([t for t in tokens if t != eos])

    def visible_text(self, request: Request) -> str:
        """The output's text as a client may see it now: cut before a stop string; while running,
        without an incomplete UTF-8 character or a tail that may still become a stop string."""
        return visible_text(self.decode(request.output), request.stop, request.finished)[0]

    @property
    def blocks_in_use(self) -> int:
        """KV blocks held by requests or kept for prefix reuse."""
        return self.blocks.allocator.num_used

    def prefix_hit_rate(self) -> float:
        return self.blocks.hit_tokens / max(self.blocks.query_tokens, 1)


def generate_many(engine: Engine, prompts, **kwargs) -> list[Request]:
    """Submit every prompt at once and run to the end (the batch view; a server adds them as they come)."""
    requests = [engine.add(p, **kwargs) for p in prompts]
    engine.run()
    return requests
