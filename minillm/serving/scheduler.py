"""Which tokens run in the next step: continuous batching with chunked prefill (Orca, Sarathi-Serve).

A request's sequence is its prompt followed by the tokens made so far; `computed` of them are in
the KV cache. Each step gives a request the next n tokens of its sequence, n >= 1; when they reach
the end of the sequence, the logits after the last one choose its next token. So the prefill of a
prompt (many tokens, perhaps in chunks), a decode (one token) and the recompute of a preempted
request are the same operation, and one step can mix them.

    continuous  every step: each running decode first (1 token each, stall-free), then chunks of
                prompts in prefill (at most prefill_chunk tokens each), then new requests admitted
                from the queue, all under a budget of max_batch_tokens tokens and max_seqs sequences
    static      the classic batch: admit up to max_seqs requests only when none is running, prefill
                their whole prompts in one step (no budget, no chunks), decode until the last one
                finishes (short answers wait for long ones)
    serial      one request at a time (max_seqs = 1, whole prompt at once, as `generate` does): the
                baseline every engine is measured against

When the KV pool cannot hold a step, the request that arrived last is preempted: its blocks are
freed and it goes back to the front of the queue with its tokens so far, to be recomputed later
(vLLM's recompute preemption). Greedy outputs are unchanged by this; sampled ones too, since each
request draws from its own generator.
"""
from __future__ import annotations

from dataclasses import dataclass, field

POLICIES = ("continuous", "static", "serial")


@dataclass
class Plan:
    """One step: the requests that run, and how many tokens of each."""
    requests: list = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    preempted: list = field(default_factory=list)
    blocks: int = 0                      # free blocks the step takes (new blocks and copies on write)

    @property
    def tokens(self) -> int:
        return sum(self.counts)


class Scheduler:
    def __init__(self, blocks, policy: str = "continuous", max_batch_tokens: int = 64, max_seqs: int = 8,
                 prefill_chunk: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        for name, value in (("max_batch_tokens", max_batch_tokens), ("max_seqs", max_seqs),
                            ("prefill_chunk", 1 if prefill_chunk is None else prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.blocks, self.policy = blocks, policy
        self.max_batch_tokens = max_batch_tokens if policy == "continuous" else 1 << 62  # only continuous chunks
        self.max_seqs = 1 if policy == "serial" else max_seqs
        self.prefill_chunk = prefill_chunk if policy == "continuous" and prefill_chunk is not None else 1 << 62
        self.waiting: list = []   # FIFO; preempted requests go back to the front
        self.running: list = []   # admitted, in arrival order

    def _room(self, request, n: int, reserved: int) -> bool:
        return self.blocks.blocks_needed(request.handle, n) + reserved <= self.blocks.available()

    def _add(self, plan: Plan, request, n: int) -> int:
        plan.requests.append(request)
        plan.counts.append(n)
        return self.blocks.blocks_needed(request.handle, n)

    def _share(self, request, plan: Plan) -> int:
        """Tokens `request` gets this step: what is left of the budget, at most prefill_chunk of a prompt."""
        return min(request.left_to_compute, self.prefill_chunk, self.max_batch_tokens - plan.tokens)

    def plan(self) -> Plan:
        plan, reserved = Plan(), 0
        # running requests: decodes first (stall-free), then prompts still in prefill
        for request in sorted(self.running, key=lambda r: r.left_to_compute > 1):
            n = self._share(request, plan)
            if n == 0 or request not in self.running:   # no budget left, or preempted for an earlier one
                continue
            while request in self.running and not self._room(request, n, reserved):
                victim = self.running[-1]                # the newest request gives its blocks back
                if victim in plan.requests:              # planned already: take it out of this step
                    i = plan.requests.index(victim)
                    reserved -= self.blocks.blocks_needed(victim.handle, plan.counts[i])
                    del plan.requests[i], plan.counts[i]
                self.preempt(victim, plan)
            if request in self.running:
                reserved += self._add(plan, request, n)
        # new requests, first come first served, while the budget, max_seqs and the pool allow
        admit = self.policy != "static" or not self.running
        while admit and self.waiting and plan.tokens < self.max_batch_tokens and len(self.running) < self.max_seqs:
            request = self.waiting[0]
            n = self._share(request, plan)
            if self.blocks.admission_cost(request.sequence, n) + reserved > self.blocks.available():
                break                                    # the pool cannot take it yet: it waits
            self.waiting.pop(0)
            request.handle, request.computed = self.blocks.open(request.sequence)
            n = self._share(request, plan)
            self.running.append(request)
            reserved += self._add(plan, request, n)
        plan.blocks = reserved
        return plan

    def preempt(self, request, plan: Plan) -> None:
        """Free a running request's blocks; it goes back to the front of the queue, to be recomputed."""
        self.running.remove(request)
        self.blocks.close(request.handle)
        request.handle, request.computed = None, 0
        request.preemptions += 1
        self.waiting.insert(0, request)
        plan.preempted.append(request)

    def finish(self, request) -> None:
        if request in self.running:
            self.running.remove(request)
            self.blocks.close(request.handle)
            request.handle = None
        elif request in self.waiting:
            self.waiting.remove(request)
