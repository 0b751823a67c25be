"""Distil a small draft model from SmolLM2-135M-Instruct, for speculative decoding (chapter 5).

    python data/distill_draft.py            # the committed checkpoint: minillm/assets/smollm2_draft.safetensors
    python data/distill_draft.py --smoke    # a minute-long run of the same steps, written to a temp file

1. Prompts: snippets of data/shakespeare.txt and minillm/assets/heldout.txt, half of them as plain text,
   half wrapped in SmolLM2's chat template with an instruction ("Rewrite...", "Continue...").
2. Teacher data: SmolLM2 reads each prompt and samples a continuation (temperature 0.8). At every
   position, prompt and continuation alike, we keep the teacher's greedy choice: the token that
   greedy verification would accept. Teacher-forced positions cost one batched prefill; the
   continuation makes the student see the teacher's own text, as it will when drafting.
3. Student: 3 layers of width 128, SmolLM2's vocabulary (49,152), tied embeddings initialised
   with the top-128 principal directions of SmolLM2's embedding matrix (so that the student
   starts in the teacher's token geometry). Loss: cross-entropy against the teacher's greedy
   choices. Saved in float16 (~14 MB).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minillm.decoding import decode  # noqa: E402
from minillm.cache.kv_cache import StaticCache  # noqa: E402
from minillm.model.loading import load_pretrained  # noqa: E402
from minillm.model import Config, Transformer  # noqa: E402

INSTRUCTIONS = ["Rewrite the following text in plain modern English:\n\n{}",
                "Continue this text:\n\n{}",
                "Summarize the following passage:\n\n{}",
                "Fix any mistakes in this text and return it:\n\n{}"]


def draft_config() -> Config:
    return Config(vocab_size=49152, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=384,
                  max_seq_len=2048, rope_theta=100000.0, tie_embeddings=True, eos_token_id=2)


def make_prompts(tok, n: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    texts = [path.read_text(encoding="utf-8") for path in (ROOT / "data" / "shakespeare.txt", ROOT / "minillm" / "assets" / "heldout.txt")]
    prompts = []
    while len(prompts) < n:
        text = texts[len(prompts) % 2]
        start = rng.randrange(0, len(text) - 2000)
        snippet = text[start:start + 1500]
        snippet = snippet[snippet.find(" ") + 1:]  # start on a word boundary
        if len(prompts) % 4 >= 2:  # chat-wrapped, the way the CLI's chat command asks
            message = rng.choice(INSTRUCTIONS).format(snippet[:400])
            ids = tok.encode_chat([{"role": "user", "content": message}])
            ids = ids[-prompt_tokens:]
        else:
            ids = tok.encode(snippet)[:prompt_tokens]
        if len(ids) == prompt_tokens:
            prompts.append(ids)
    return prompts


@torch.inference_mode()
def teacher_batch(teacher, prompts: torch.Tensor, new_tokens: int, temperature: float, generator):
    """(B, P) prompts -> tokens (B, P + new) and the teacher's greedy choice after each (B, P + new).
    The decoding loop samples the continuation and keeps the hidden states it computed; the head
    turns them back into the teacher's choice at every position, and one more forward gives the last."""
    B, P = prompts.shape
    cache = StaticCache(teacher.config, B, P + new_tokens)
    run = decode(teacher, prompts, new_tokens, temperature=temperature, seed=generator, eos_token_id=None,
                 cache=cache, keep_hidden=True)
    tokens = torch.cat([prompts, torch.tensor(run.rows)], dim=1)
    last = teacher(tokens[:, -1:], cache=cache)                   # (B, 1, V) after the last sampled token
    return tokens, torch.cat([teacher.output(run.hidden).argmax(-1), last.argmax(-1)], dim=1)


def init_student(teacher, config: Config) -> Transformer:
    torch.manual_seed(0)
    student = Transformer(config)
    E = teacher.tok_embeddings.weight.detach().float()            # (V, 576)
    _, _, Vh = torch.linalg.svd(E[::4], full_matrices=False)       # principal directions (576, 576)
    with torch.no_grad():
        projected = E @ Vh[:config.dim].T                          # (V, dim): the teacher's geometry
        student.tok_embeddings.weight.copy_(projected * (0.02 / projected.std()))  # at the usual init scale
    return student


def train_student(student, inputs, targets, steps: int, batch_size: int, lr: float, log_every: int = 25):
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    history = []
    for step in range(steps):
        lr_now = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr_now
        rows = torch.randint(0, inputs.shape[0], (batch_size,), generator=g)
        logits = student(inputs[rows])                                   # (b, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets[rows].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {lr_now:.2e}", flush=True)
    return history


def save_draft(model, path) -> None:
    """float16 safetensors with the Config as JSON (read by minillm.decoding.drafters.load_draft_model)."""
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if k != "output.weight"}
    save_file(state, str(path), metadata={"format": "minillm", "config": json.dumps(asdict(model.config))})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the pipeline in about a minute")
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=32, help="teacher batch size")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=str(ROOT / "minillm" / "assets" / "smollm2_draft.safetensors"))
    p.add_argument("--data-cache", default=None, help="save/load the teacher data here (.pt)")
    args = p.parse_args(argv)
    if args.smoke:
        args.prompts, args.prompt_tokens, args.new_tokens, args.batch, args.steps = 4, 32, 8, 4, 10
        args.out = str(Path(tempfile.gettempdir()) / "smollm2_draft_smoke.safetensors")
    teacher, tok = load_pretrained("smollm2-135m")
    start = time.perf_counter()
    if args.data_cache and Path(args.data_cache).exists():
        inputs, targets = torch.load(args.data_cache)
    else:
        prompts = torch.tensor(make_prompts(tok, args.prompts, args.prompt_tokens, seed=0))
        g = torch.Generator().manual_seed(0)
        seqs, greedy = [], []
        for i in range(0, len(prompts), args.batch):
            s, gr = teacher_batch(teacher, prompts[i:i + args.batch], args.new_tokens, 0.8, g)
            seqs.append(s), greedy.append(gr)
            print(f"teacher data {i + len(s)}/{len(prompts)}  {time.perf_counter() - start:.0f} s", flush=True)
        seqs, greedy = torch.cat(seqs), torch.cat(greedy)
        inputs, targets = seqs[:, :-1], greedy[:, :-1]  # the last greedy choice follows an unseen token
        if args.data_cache:
            torch.save((inputs, targets), args.data_cache)
    print(f"teacher data: {inputs.numel()} labelled positions")
    student = init_student(teacher, draft_config())
    history = train_student(student, inputs, targets, args.steps, batch_size=8, lr=3e-3, log_every=10)
    save_draft(student, args.out)
    print(f"saved {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB), final loss {history[-1]:.3f}, "
          f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
