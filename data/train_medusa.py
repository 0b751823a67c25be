"""Train SmolLM2's Medusa heads by self-distillation and write minillm/assets/medusa_smollm2.safetensors (+ .json).

    python data/train_medusa.py            # the committed weights (~5 min on an idle CPU core)
    python data/train_medusa.py --smoke    # a few sequences and steps, seconds; writes to /tmp unless --out

SmolLM2 greedily continues 32-token windows of minillm/assets/heldout.txt and data/shakespeare.txt; head d
learns the model's own token d+2 ahead (minillm/decoding/medusa.py). The last sequences are held out to
measure each head's top-k accuracy, which the .json keeps for tuning the static tree.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minillm.model.loading import load_pretrained  # noqa: E402
from minillm.decoding import decode  # noqa: E402
from minillm.decoding.medusa import MedusaHeads, head_accuracy, head_targets, save_heads, train_heads  # noqa: E402
from minillm.timing import machine_settings  # noqa: E402

HERE = Path(__file__).resolve().parent


def prompts(tok, n: int, length: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    texts = [(HERE.parent / "minillm" / "assets" / "heldout.txt").read_text(), (HERE / "shakespeare.txt").read_text()[:400_000]]
    rows = []
    for i in range(n):
        text = texts[i % 2]
        start = rng.randrange(len(text) - 2000)
        rows.append(tok.encode(text[start:start + 2000])[:length])
    return torch.tensor(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--heads", type=int, default=3)
    args = p.parse_args(argv)
    n_train, n_eval, new_tokens, steps = (4, 2, 16, 5) if args.smoke else (64, 6, 48, 200)
    out = Path(args.out or ("/tmp/medusa_smoke.safetensors" if args.smoke else HERE.parent / "minillm" / "assets" / "medusa_smollm2.safetensors"))
    torch.manual_seed(0)
    torch.set_num_threads(1)  # on a shared 2-core CPU a second OpenMP thread mostly waits
    model, tok = load_pretrained("smollm2-135m")
    start = time.perf_counter()
    ids = prompts(tok, n_train + n_eval, 32, seed=0)
    run = decode(model, ids, new_tokens, eos_token_id=None, keep_hidden=True)  # SmolLM2 continues greedily
    hidden, seqs = run.hidden, torch.cat([ids, torch.tensor(run.rows)], dim=1)
    train = head_targets(hidden[:n_train], seqs[:n_train], 32, args.heads)
    held = head_targets(hidden[n_train:], seqs[n_train:], 32, args.heads)
    print(f"data: {len(train[0][1])} training positions per head, {time.perf_counter() - start:.0f} s", flush=True)
    heads = MedusaHeads(model.config.dim, args.heads)
    before = head_accuracy(model, heads, held)
    losses = train_heads(model, heads, train, steps, log_every=25)
    after = head_accuracy(model, heads, held)
    print(f"loss {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}; {time.perf_counter() - start:.0f} s")
    for d in range(args.heads):
        print(f"head {d} (token t+{d + 2}) held-out top-1 {before[d][0]:.3f} -> {after[d][0]:.3f}, "
              f"top-8 {sum(before[d]):.3f} -> {sum(after[d]):.3f}")
    save_heads(heads, out)
    out.with_suffix(".json").write_text(json.dumps({
        "held_out_accuracy": after, "untrained_accuracy": before, "losses": losses[::10],
        "train_sequences": n_train, "held_out_sequences": n_eval, "new_tokens": new_tokens, "steps": steps,
        "settings": machine_settings()}, indent=1))
    print(f"wrote {out.name} ({out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
