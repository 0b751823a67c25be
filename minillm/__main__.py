"""The command line: `python -m minillm generate | chat | bench | train ...`.

    python -m minillm generate --prompt "Once upon a time" --max-new-tokens 64
    python -m minillm chat --prompt "What is the capital of France?"
    python -m minillm bench [model | tokenizer | kv | quant | moe | speculative | tree]
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def add_sampling_args(p):
    p.add_argument("--prompt", required=True, help="the text to continue (chat: the user's message)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--cache", default="static", help="KV cache: static (default) or none")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--kernels", default="torch", choices=["torch", "triton"],
                   help="triton: attention, RMSNorm and int4 linears run as Triton kernels (chapter 7)")


def cmd_generate(args, chat: bool = False) -> int:
    import torch

    from .generate import stream
    from .loading import load_pretrained

    model, tok = load_pretrained("smollm2-135m")
    if args.kernels != "torch":  # warns and keeps PyTorch where Triton cannot run
        model.use_kernels(args.kernels)
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        prompt_ids = tok.encode(text, allowed_special="all")
    else:
        prompt_ids = tok.encode(args.prompt)
    ids = torch.tensor([prompt_ids])
    new_ids, shown = [], ""
    start = time.perf_counter()
    for next_id in stream(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, cache=args.cache):
        token = int(next_id[0])
        if token == model.config.eos_token_id:
            break
        new_ids.append(token)
        if not args.json:  # print what is new; a UTF-8 character split across tokens shows when complete
            text = tok.decode(new_ids)
            if not text.endswith("\ufffd"):
                print(text[len(shown):], end="", flush=True)
                shown = text
    seconds = time.perf_counter() - start
    text = tok.decode(new_ids)
    if args.json:
        print(json.dumps({"text": text, "prompt_tokens": len(prompt_ids), "new_token_ids": new_ids,
                          "seconds": round(seconds, 4),
                          "tokens_per_second": round(len(new_ids) / seconds, 2) if seconds > 0 else None}))
    else:
        print(text[len(shown):], flush=True)
    return 0


def cmd_bench(args) -> int:
    if args.what == "model":
        from .bench import bench_model

        bench_model(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_sampling_args(sub.add_parser("generate", help="continue a prompt with SmolLM2-135M-Instruct"))
    add_sampling_args(sub.add_parser("chat", help="answer a message, wrapped in SmolLM2's chat template"))
    bench = sub.add_parser("bench", help="measure speed against a baseline in the same run")
    bench.add_argument("what", nargs="?", default="model", choices=["model"])
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        if args.command in ("generate", "chat"):
            return cmd_generate(args, chat=args.command == "chat")
        return cmd_bench(args)
    except ValueError as e:  # bad input: say what was wrong, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
