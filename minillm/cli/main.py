"""The command line: `python -m minillm generate | chat | bench | eval | serve | train ...`.

    python -m minillm generate --prompt "Once upon a time" --max-new-tokens 64 --stop "."
    python -m minillm chat --prompt "What is the capital of France?"
    python -m minillm chat --system "You are terse."       # then one user turn a line on stdin
    python -m minillm generate --model data/moe/dense.safetensors --prompt "HELENA."   # a model trained here
    python -m minillm quantize --quant gptq --out smollm2-gptq.safetensors   # once; then generate --model it
    python -m minillm serve --port 8000          # OpenAI-compatible: /v1/chat/completions, ...
    python -m minillm info                       # CPU, which C++ kernels run here, the choices remembered
    python -m minillm bench [model | tokenizer | kv | quant | moe | speculative | tree | stack | serve | report]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path

from ..backends import BACKENDS
from ..model.loading import ModelFileError

# Half the logical CPUs (about the physical cores where SMT doubles them), at least 1. More threads than
# free cores makes every matmul wait for a descheduled thread: on the course's 2-core VM, float32 decode
# measured 18.8 tok/s with 1 thread and 15.3 with 2 (idle machine), and far worse under load.
DEFAULT_THREADS = max(1, (os.cpu_count() or 2) // 2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, unless the help already names it or the flag is a switch."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


# Whether each option of generate/chat was given (differs from its default): the commands that cannot
# honour an option name it in their refusal.
GIVEN = {"--fast": lambda a: a.fast, "--quant": lambda a: a.quant != "none", "--dtype": lambda a: a.dtype != "float32",
         "--head": lambda a: a.head != "float", "--compile": lambda a: a.compile, "--draft": lambda a: bool(a.draft),
         "--tree": lambda a: bool(a.tree), "--cache": lambda a: a.cache != "static",
         "--kernels": lambda a: a.kernels != "torch", "--special": lambda a: a.special != "refuse",
         "--fixed-width": lambda a: a.fixed_width is not None, "--consistent": lambda a: a.consistent,
         "--native": lambda a: a.native, "--backend": lambda a: getattr(a, "backend_typed", getattr(a, "backend", "auto")) != "auto"}


def flags_given(args, *flags) -> list[str]:
    return [flag for flag in flags if GIVEN[flag](args)]


def add_threads_arg(p, default=DEFAULT_THREADS):
    p.add_argument("--threads", type=int, default=default,
                   help=f"torch threads (default {default}: half this machine's logical CPUs; more threads than "
                        f"free cores slows every step down)")


def add_sampling_args(p):
    p.add_argument("--prompt", action="append", default=None,
                   help="the text to continue (chat: the user's message; without it, chat reads one turn a line "
                        "from stdin and keeps the conversation); generate takes several, run as one batch")
    p.add_argument("--system", default=None, help="chat: the system prompt (default: SmolLM2's own)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop where this text appears, and print what came before it (repeatable)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a SmolLM2 file saved by `python -m minillm quantize`, or a byte-level checkpoint made by "
                        "`python -m minillm train` (generate only; e.g. data/moe/dense.safetensors)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (EOS stops sooner)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens only (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens whose probability reaches p (default: no limit)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling, for a repeatable run (default: none)")
    p.add_argument("--cache", default="static", choices=["static", "paged", "none"],
                   help="KV cache: static (default), paged, or none (recompute every step)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--special", default="refuse", choices=["refuse", "allow", "text"],
                   help="generate: special-token text such as <|im_end|> in --prompt is refused (default), "
                        "encoded as control tokens (allow) or as plain text (text); chat always encodes "
                        "the message as plain text")
    p.add_argument("--allow-special", dest="special", action="store_const", const="allow",
                   help="the same as --special allow")
    p.add_argument("--kernels", default="torch", choices=["torch", "triton"],
                   help="triton: attention, RMSNorm and int4 linears run as Triton kernels (chapter 7)")
    p.add_argument("--tree", default=None, choices=["recycling", "recycling-dynamic", "recycling-pairs", "medusa",
                                                      "lookup+recycling"],
                   help="tree-verified decoding (chapter 6): Token Recycling (recycling-dynamic: its tree grown best "
                        "first; recycling-pairs: that, guesses keyed by the last two tokens), Medusa heads, or "
                        "prompt lookup's chain and Token Recycling merged in one tree; batch 1")
    p.add_argument("--draft", default=None, help="speculative decoding (chapter 5): ngram | layerskip:N | distilled | "
                   "a draft checkpoint path (e.g. minillm/assets/smollm2_draft.safetensors); batch 1")
    p.add_argument("--draft-len", type=int, default=None,
                   help="tokens proposed per target forward (default: 4 with --draft, the whole tree with --tree)")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="how the steps run: auto (the fastest here for these weights, measured once and remembered, "
                        "said in one line), eager (PyTorch op by op: the reference), compiled (torch.compile; "
                        "compiles for tens of seconds first), native (one C++ call per step; bfloat16 or "
                        "quantized weights, AVX512-BF16)")
    p.add_argument("--compile", action="store_true", help="deprecated: --backend compiled")
    add_fixed_width_arg(p, deprecated=True)
    p.add_argument("--fast", action="store_true",
                   help="the fastest lossless stack measured on this machine (weights, backend, drafter; a few "
                        "seconds the first time, then remembered), with its quality cost against float32")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: chosen with the backend, measured: one or every core)")
    add_quant_args(p)


def add_fixed_width_arg(p, deprecated=False):
    if deprecated:   # generate and chat: the backend says how its widths agree (backends/choice.py)
        p.add_argument("--native", action="store_true", help="deprecated: --backend native")
        p.add_argument("--fixed-width", type=int, default=None, metavar="W",
                       help="deprecated: with --compile, one width-W graph for every step (--backend compiled with "
                            "a drafter computes every width alike by itself)")
        p.add_argument("--consistent", action="store_true",
                       help="deprecated: --backend compiled with a drafter computes every width alike by itself")
        return
    p.add_argument("--native", action="store_true",
                   help="run every decode and verify step of 1-16 tokens as one C++ call (backends/native_step.py; static cache, "
                        "batch 1, bfloat16/int8/int4 weights, AVX512-BF16): plain and speculative/tree decoding give "
                        "the same tokens, and no compiler runs but the C++ one; bench stack --native: chapter 8's "
                        "race with the native step in the compiled step's place (data/runs/xeon-amx/stack_results_native.json)")
    p.add_argument("--fixed-width", type=int, default=None, metavar="W",
                   help="with --compile: every decode and verify step runs the one width-W graph, so plain and "
                        "speculative/tree decoding compute each token identically (same tokens in bfloat16 and "
                        "int4 too) at the price of a W-wide plain step; drafts are cut to W - 1 tokens")
    p.add_argument("--consistent", action="store_true",
                   help="with --compile: every width computes a token's logits alike (linears on minillm.native.gemv, attention "
                        "on minillm.native.attention: bfloat16/quantized weights, AVX512-BF16), so plain and speculative/tree "
                        "decoding give the same tokens with plain steps of one row")


def check_fixed_width(args) -> None:
    compiled = args.compile or getattr(args, "backend", None) == "compiled"
    add = "--backend compiled" if hasattr(args, "backend") else "--compile"   # bench keeps --compile
    if args.native and args.compile:
        raise ValueError("--native and --compile are two kinds of step: choose one")
    if args.native and args.quant == "none" and args.dtype == "float32" and getattr(args, "model", None) is None:
        raise ValueError("--native needs bfloat16 or quantized weights (--dtype bfloat16 or --quant int8/int4/...): "
                         "float32 linears have no few-row kernel in minillm.native.gemv")
    if args.consistent and not compiled:
        raise ValueError(f"--consistent is a kind of compiled step: add {add}")
    if args.consistent and args.fixed_width is not None:
        raise ValueError("--consistent and --fixed-width are two ways to the same tokens: choose one")
    if args.fixed_width is None:
        return
    if not compiled:
        raise ValueError(f"--fixed-width is the width of the compiled step: add {add}")
    if not 1 <= args.fixed_width <= 64:
        raise ValueError(f"--fixed-width must be an int in [1, 64], got {args.fixed_width}")


def add_quant_args(p, dtype_default="float32"):
    p.add_argument("--quant", default="none", choices=["none", "int8", "int4", "gptq", "awq"],
                   help="weight-only quantization of the transformer linears (chapter 3); gptq/awq calibrate "
                        "on minillm/assets/calibration.txt first (a minute or two)")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size (must divide 576 and 1536)")
    p.add_argument("--head", default="float", choices=["float", "int8"],
                   help="int8: quantize the output head too (per channel), as llama.cpp does")
    p.add_argument("--dtype", default=dtype_default, choices=["float32", "bfloat16"],
                   help="weights and activations of the float parts (float32: the reference" +
                        ("; bench: bfloat16 for serve, float32 for the others, as their committed figures)"
                         if dtype_default is None else ")"))


def cmd_generate(args, chat: bool = False) -> int:
    """generate / chat: one path through decoding.decode_steps, whatever the drafter (none, a chain, a tree).

    chat without --prompt reads the user's turns from stdin, one a line, and answers each with the
    whole conversation so far (multi-turn); --system replaces SmolLM2's default system prompt."""
    from ..backends.stack import compile_stack, describe, load_stack
    from ..model.llama import smollm2_135m
    from ..tokenization.tokenizer import Tokenizer

    if args.draft and args.tree:
        raise ValueError("give --draft (chapter 5) or --tree (chapter 6), not both")
    if args.prompt is None and not chat:
        raise ValueError("generate needs --prompt TEXT (chat without --prompt reads its turns from stdin)")
    if args.system is not None and not chat:
        raise ValueError("--system belongs to chat: generate continues --prompt as it is")
    check_args_before_loading(args)  # seconds of loading are not spent on a command that must fail
    legacy_backend(args)
    prompts = args.prompt or []
    if len(prompts) > 1:
        if chat:
            raise ValueError("chat takes one --prompt (for a conversation give none and type the turns on stdin)")
        chosen = flags_given(args, "--draft", "--tree", "--compile", "--native", "--fast", "--kernels")
        chosen += [f"--backend {args.backend}"] if args.backend_typed not in ("auto", "eager") else []
        if chosen:
            raise ValueError(f"several --prompt run as one batch, which {', '.join(chosen)} cannot: give one "
                             f"prompt or drop {', '.join(chosen)}")
    args.prompt = prompts[0] if prompts else None
    quantized = args.model is not None and is_quantized_file(args.model)
    if args.model is not None and not quantized:
        return generate_from_checkpoint(args, chat, prompts)
    if quantized:
        chosen = flags_given(args, "--fast", "--quant", "--dtype", "--head")
        if chosen:
            raise ValueError(f"--model {args.model} is already quantized (its file says how): drop {', '.join(chosen)}")
    weights = dict(dtype=args.dtype, quant=args.quant, group_size=args.group_size, head=stack_head(args))
    if args.fast:
        weights = choose_fast(args)
    if args.kernels != "torch":  # before the model: kernels picks Triton's interpreter before torch imports triton
        from kernels import interpreting
        from kernels.swap import use_kernels

        if interpreting():
            print("warning: no CUDA GPU: --kernels triton runs Triton's CPU interpreter, one kernel program at a "
                  "time in numpy (SmolLM2: ~6 s per token on a 2-core AVX2 CPU, ~80x slower than --kernels "
                  "torch); it checks the kernels, it is not fast", file=sys.stderr, flush=True)
    for backend, old in (("compiled", "--compile"), ("native", "--native")):
        flag = old if GIVEN[old](args) else f"--backend {backend}"
        if args.backend == backend and args.cache != "static":
            raise ValueError(f"{flag} needs --cache static (its step writes a static buffer), got --cache {args.cache}")
        if args.backend == backend and args.kernels != "torch":
            raise ValueError(f"{flag} and --kernels triton cannot be combined: choose one")
    if args.tree and args.temperature > 0:
        print(f"note: --tree {args.tree} with --temperature > 0 accepts by Medusa's typical acceptance: faster, but "
              f"the text no longer follows the model's own sampling distribution (lossy); --draft stays exact",
              file=sys.stderr, flush=True)
    tok = Tokenizer.from_pretrained("smollm2-135m")   # cached: load_stack returns this same object
    context = smollm2_135m().max_seq_len
    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    if chat and args.prompt is None:
        prompt_ids = None
    elif chat:  # the template's markers are the only control tokens: the message is plain text
        prompt_ids = fit_context(tok, args.prompt, args, context, lambda: tok.encode_chat(
            system + [{"role": "user", "content": args.prompt}], add_generation_prompt=True))
    else:
        prompt_ids = [fit_context(tok, text, args, context, lambda: encode_prompt(tok, text, args))
                      for text in prompts]
        prompt_ids = prompt_ids[0] if len(prompts) == 1 else prompt_ids
    if quantized:
        from ..quant import load_quantized

        path = Path(args.model)
        model = load_quantized(path)
        if model.config.vocab_size != tok.vocab_size:
            raise ValueError(f"--model {args.model}: vocab_size {model.config.vocab_size} is not SmolLM2's {tok.vocab_size}")
        name = f"quantized file {args.model}"
        weights_key = f"quantized file {path.name} ({path.stat().st_size} bytes)"
    else:
        model, tok = load_stack(**weights, progress=True)
        name = weights_key = describe(**weights)
    if args.kernels != "torch":  # warns and keeps PyTorch where Triton cannot run
        use_kernels(model, args.kernels)
    if args.fixed_width is not None or args.consistent:     # the deprecated spellings of a compiled step
        model = compile_stack(model, args.fixed_width, args.consistent)
        label = name + ", " + describe(compile=True, fixed_width=args.fixed_width,
                                       consistent=args.consistent).split(", ", 1)[1]
        set_threads(args.threads or DEFAULT_THREADS)
        args.backend_used, args.threads_used = "compiled", torch_threads()
    else:
        from ..backends import choose

        choice = choose(model, args.backend, weights=weights_key, threads=args.threads,
                        drafter=bool(args.draft or args.tree or args.fast), cache=args.cache, batch=max(len(prompts), 1),
                        kernels=args.kernels)
        print(choice.line, file=sys.stderr, flush=True)
        model, args.backend_used, args.threads_used = choice.model, choice.backend, choice.threads
        if args.fast:
            fast_drafter(args, choice, tok)
        label = name if choice.backend == "eager" else f"{name}, {choice.label}"
    label += f", drafter {args.draft or args.tree}" if args.draft or args.tree else ""
    if len(prompts) > 1:
        run_batch(model, tok, prompt_ids, args, label)
        return 0
    if prompt_ids is not None:
        run_turn(model, tok, prompt_ids, args, label)
        return 0
    messages = list(system)
    for line in sys.stdin:  # multi-turn: the conversation so far, then this turn
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = tok.encode_chat(messages, add_generation_prompt=True)
        if len(ids) + args.max_new_tokens > context:
            raise ValueError(f"the conversation is {len(ids)} tokens long: with --max-new-tokens "
                             f"{args.max_new_tokens} it no longer fits the model's context of {context}")
        messages.append({"role": "assistant", "content": run_turn(model, tok, ids, args, label)})
    return 0


def legacy_backend(args) -> None:
    """--compile, --native, --fixed-width and --consistent, the old spellings of a backend (check_fixed_width has
    checked how they combine): kept one release, each with a note saying what replaces it; refused beside a
    --backend that says otherwise."""
    args.backend_typed = args.backend
    for flag, backend in (("--compile", "compiled"), ("--native", "native")):
        if GIVEN[flag](args):
            if args.backend not in ("auto", backend):
                raise ValueError(f"{flag} and --backend {args.backend} say two things: drop {flag}")
            args.backend = backend
            print(f"note: {flag} is deprecated: say --backend {backend}", file=sys.stderr, flush=True)
    if args.fixed_width is not None or args.consistent:
        print("note: --fixed-width and --consistent are deprecated: --backend compiled with a drafter computes "
              "every width alike by itself", file=sys.stderr, flush=True)
    if args.backend == "native" and args.quant == "none" and args.dtype == "float32" and args.model is None \
            and not args.fast:
        raise ValueError("--backend native needs bfloat16 or quantized weights (--dtype bfloat16 or --quant "
                         "int8/int4/...): float32 linears have no few-row kernel in minillm.native.gemv")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def fit_context(tok, text: str, args, context: int, encode):
    """encode() once the prompt is known to fit (a bound from its length first: no huge encode is wasted)."""
    if tok.min_tokens(text) + args.max_new_tokens > context:
        raise ValueError(f"the prompt is at least {tok.min_tokens(text)} tokens long: with --max-new-tokens "
                         f"{args.max_new_tokens} it cannot fit the model's context of {context}")
    ids = encode()
    if len(ids) + args.max_new_tokens > context:
        raise ValueError(f"the prompt is {len(ids)} tokens long: with --max-new-tokens {args.max_new_tokens} "
                         f"it cannot fit the model's context of {context}")
    return ids


def encode_prompt(tok, text: str, args) -> list[int]:
    """generate's prompt under --special: refused (default), control tokens (allow) or plain text."""
    if args.special == "allow":
        return tok.encode(text, allowed_special="all")
    if args.special == "text":
        return tok.encode(text, disallowed_special=())
    try:
        return tok.encode(text)
    except ValueError as e:
        raise ValueError(f"{str(e).split('. Pass')[0]}; pass --special allow to encode it as a control "
                         f"token or --special text to encode it as plain text") from None


def run_batch(model, tok, batch, args, label: str) -> None:
    """Several prompts decoded together (one batch, left-padded under an attention mask): each completion
    in turn, separated by a line "---", or one JSON object a line with --json."""
    from ..decoding.loop import check_stop, decode, visible_text

    stop = check_stop(args.stop)
    start = time.perf_counter()
    result = decode(model, batch, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, cache=args.cache)
    seconds = time.perf_counter() - start
    eos = model.config.eos_token_id
    for i, (ids, row) in enumerate(zip(batch, result.rows)):
        new_ids = row[:row.index(eos)] if eos is not None and eos in row else row
        text, _ = visible_text(tok.decode(new_ids), stop, finished=True)
        if args.json:
            print(json.dumps({"index": i, "text": text, "prompt_tokens": len(ids), "prompt_ids": ids,
                              "new_token_ids": new_ids, "batch_size": len(batch), "batch_seconds": round(seconds, 4),
                              "stack": label}), flush=True)
        else:
            print(("---\n" if i else "") + text, flush=True)


def run_turn(model, tok, prompt_ids, args, label: str) -> str:
    """Generate from prompt_ids: stream the text (or print one JSON object); returns the text."""
    from ..decoding.loop import DecodeResult, stream_text

    result = DecodeResult(rows=[])
    start = time.perf_counter()
    pieces = []
    for piece in stream_text(model, tok, prompt_ids, args.max_new_tokens, drafter=args.draft or args.tree,
                             draft_len=args.draft_len, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, cache=args.cache, result=result, stop=args.stop):
        pieces.append(piece)
        if not args.json:  # each piece is whole characters: a UTF-8 character split across tokens waits
            print(piece, end="", flush=True)
    seconds = time.perf_counter() - start
    eos = model.config.eos_token_id
    new_ids = [t for t in result.tokens if t != eos]
    text = "".join(pieces)
    if args.json:
        report = {"text": text, "prompt_tokens": len(prompt_ids), "prompt_ids": prompt_ids, "new_token_ids": new_ids,
                  "seconds": round(seconds, 4),
                  "tokens_per_second": round(len(new_ids) / seconds, 2) if seconds > 0 else None,
                  "target_forwards": result.target_forwards,
                  "accepted_per_forward": round(result.accepted_per_forward, 4)}
        report.update(split_timings(result, len(prompt_ids), seconds, start))
        report.update(backend=getattr(args, "backend_used", "eager"), threads=getattr(args, "threads_used", None))
        if args.draft or args.tree:
            report["acceptance_rate"] = round(result.acceptance_rate, 4)
        report["stack"] = label
        print(json.dumps(report), flush=True)
    else:
        print(flush=True)
    return text


def split_timings(result, prompt_tokens: int, seconds: float, started: float | None = None) -> dict:
    """Prefill apart from decode, as llama.cpp's `timings` report them: the prefill is the time to the first token
    (the prompt's forward and the first token it gives), decode the tokens after it over the time after it."""
    if result.prefill_seconds is None:
        return {}
    # started: when the caller's clock began (its `seconds` then include the drafter's and cache's set-up)
    prefill = result.prefill_seconds if started is None else result.first_token_at - started
    decode_seconds = max(seconds - prefill, 0.0)
    decode_tokens = len(result.rows[0]) - result.first_tokens
    return {"prefill_seconds": round(prefill, 4),
            "prefill_tokens_per_second": round(prompt_tokens / prefill, 2) if prefill > 0 else None,
            "decode_seconds": round(decode_seconds, 4), "decode_tokens": decode_tokens,
            "decode_tokens_per_second": round(decode_tokens / decode_seconds, 2) if decode_tokens and decode_seconds else None}


def is_quantized_file(path) -> bool:
    """Whether path is a file written by quant.save_quantized (else a checkpoint from train, or an error later)."""
    from safetensors import SafetensorError, safe_open

    from ..quant.storage import FORMAT

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError):
        return False


def cmd_quantize(args) -> int:
    """Quantize SmolLM2 once (GPTQ/AWQ calibrate for a minute) and save it; `generate --model PATH` loads it in seconds."""
    from pathlib import Path

    from ..backends.stack import describe, load_stack
    from ..quant import model_bytes, save_quantized

    if args.quant == "none":
        raise ValueError("--quant none leaves nothing to save: choose int8, int4, gptq or awq")
    if Path(args.out).suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {args.out!r}")
    set_threads(args.threads)
    model, _ = load_stack(args.dtype, args.quant, args.group_size, stack_head(args), progress=True)
    save_quantized(model, args.out)
    print(f"{describe(args.dtype, args.quant, args.group_size, stack_head(args))}: {model_bytes(model):,d} bytes of "
          f"weights in memory, file {Path(args.out).stat().st_size:,d} bytes -> {args.out}")
    return 0


def generate_from_checkpoint(args, chat: bool, prompts: list[str]) -> int:
    """--model PATH: a byte-level checkpoint made by `python -m minillm train`, float32, plain decoding."""
    from ..model.train import ByteTokenizer, load_checkpoint

    if chat:
        raise ValueError("--model takes a byte-level checkpoint trained here, which has no chat template: "
                         "use generate")
    chosen = flags_given(args, "--fast", "--quant", "--dtype", "--head", "--compile", "--native", "--draft", "--tree",
                         "--kernels", "--special", "--backend")
    if chosen:
        raise ValueError(f"--model runs a small trained checkpoint as it is: drop {', '.join(chosen)}")
    set_threads(args.threads or DEFAULT_THREADS)
    model, tok = load_checkpoint(args.model), ByteTokenizer()
    if model.config.vocab_size != tok.vocab_size:
        raise ValueError(f"--model {args.model}: vocab_size {model.config.vocab_size}, not a byte-level (256) "
                         f"checkpoint from `python -m minillm train`")
    prompt_ids = [fit_context(tok, text, args, model.config.max_seq_len, lambda: tok.encode(text))
                  for text in prompts]
    label = f"checkpoint {args.model}, float32"
    if len(prompt_ids) > 1:
        run_batch(model, tok, prompt_ids, args, label)
    else:
        run_turn(model, tok, prompt_ids[0], args, label)
    return 0


def check_args_before_loading(args) -> None:
    """The checks that need no model, done before loading one (the loop repeats them where it starts)."""
    from ..decoding.loop import check_draft_spec
    from ..decoding.sampling import check_sampling

    if args.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {args.max_new_tokens}")
    set_threads(args.threads)
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.draft_len is not None and not 0 <= args.draft_len <= 256:
        raise ValueError(f"draft_len must be an int in [0, 256], got {args.draft_len}")
    if args.draft:
        check_draft_spec(args.draft)
    check_fixed_width(args)


def choose_fast(args) -> dict:
    """--fast: the weights it runs (stack.FAST_WEIGHTS); the backend and drafter are measured once loaded."""
    from ..backends.stack import FAST_WEIGHTS

    chosen = flags_given(args, "--dtype", "--quant", "--head", "--compile", "--native", "--draft", "--tree", "--cache",
                         "--kernels", "--fixed-width", "--consistent", "--backend")
    if chosen:
        raise ValueError(f"--fast chooses the stack itself: drop {', '.join(chosen)} (or drop --fast)")
    return dict(FAST_WEIGHTS)


def fast_drafter(args, choice, tok) -> None:
    """--fast, once the backend is chosen: the drafter raced fastest here without changing a token, set on args,
    and one line saying what it measured and what the weights cost against float32."""
    from ..backends.stack import fastest_here

    drafter, figures, cached = fastest_here(choice.model, tok, choice.label, choice.threads)
    args.draft = drafter
    rows = sorted(((k, v) for k, v in figures.items() if k != "agree_with_float32"), key=lambda kv: -kv[1]["tok_s"])
    race = ", ".join(f"{k} {v['tok_s']:g}" + ("" if v["lossless"] else " (changed tokens)") for k, v in rows)
    print(f"fast: drafter {drafter or 'none'} ({'remembered' if cached else 'raced'} here, decode tok/s: {race}); "
          f"quality: greedy tokens equal float32's for the first {figures['agree_with_float32']:g} of 48 on average "
          f"(int4 Q4_1 + int8 head, the GGUF's own weights)", file=sys.stderr, flush=True)


def set_threads(threads: int | None) -> None:
    import torch

    if threads is None:     # generate and chat: chosen with the backend
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def stack_head(args):
    return None if args.head == "float" else args.head


def cmd_eval(args) -> int:
    from pathlib import Path

    from ..backends.stack import load_stack
    from ..model.perplexity import perplexity
    from ..quant import model_bytes

    if not Path(args.text).is_file():
        raise ValueError(f"--text must be a readable text file, got {args.text!r} (no such file)")
    set_threads(args.threads)
    for name, value in (("context", args.context), ("max_tokens", args.max_tokens)):
        if value is not None and value < 2:  # before loading: perplexity() says the same after
            raise ValueError(f"{name} must be an int >= 2 (a prediction needs two tokens), got {value!r}")
    model, tok = load_stack(args.dtype, args.quant, args.group_size, stack_head(args), progress=True)
    ppl, tokens = perplexity(model, tok, Path(args.text).read_text(), context=args.context,
                             max_tokens=args.max_tokens, return_tokens=True)
    result = {"quant": args.quant, "group_size": args.group_size, "head": args.head, "dtype": args.dtype,
              "perplexity": round(ppl, 4), "tokens": tokens,
              "model_bytes": model_bytes(model)}
    print(json.dumps(result) if args.json else "  ".join(f"{k}={v}" for k, v in result.items()))
    return 0


def cmd_serve(args) -> int:
    """An OpenAI-compatible server (chapter 9) in the foreground, until Ctrl-C."""
    import torch
    import uvicorn

    from ..backends.stack import describe, load_stack
    from ..serving import Engine
    from ..serving.server import build_app

    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    for name in ("max_seqs", "max_batch_tokens", "max_waiting", "threads"):
        if getattr(args, name) < (0 if name == "max_waiting" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'max_waiting' else 1}, "
                             f"got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    model, tok = load_stack(args.dtype, args.quant, args.group_size, stack_head(args), progress=True)
    engine = Engine(model, tok, max_batch_tokens=args.max_batch_tokens, max_seqs=args.max_seqs,
                    max_waiting=args.max_waiting, policy=args.policy)
    print(f"minillm: serving SmolLM2-135M-Instruct ({describe(args.dtype, args.quant, args.group_size, stack_head(args))}, "
          f"{args.policy} batching: {engine.scheduler.max_seqs} sequences, {args.max_batch_tokens} tokens a step, "
          f"{args.threads} threads) at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(build_app(engine), host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_info() -> int:
    """The machine line, the C++ kernel probe and where auto's measurements are remembered (llama.cpp's
    system_info, for this package)."""
    from ..backends import autotune
    from ..backends.choice import probe
    from ..timing import machine_line

    print(machine_line())
    print(probe())
    print(f"remembered for this machine: {len(autotune.entries())} choice(s) in {autotune.cache_file()}")
    return 0


def cmd_bench(args) -> int:
    if args.what == "report":  # renders the results files; measures nothing
        from ..bench.report import write_report

        return write_report(Path("."))
    if args.threads is None:  # the figures committed were measured so: serve, stack and quant with 2, the others 1
        args.threads = 2 if args.what in ("serve", "stack", "quant") else 1
    if args.new_tokens is None:
        args.new_tokens = {"stack": 128, "quant": 32}.get(args.what, 64)
    if args.dtype is None:  # serve: float32's multi-row matmuls would cost the batch its TPOT (chapter 9)
        args.dtype = "bfloat16" if args.what == "serve" else "float32"
    if args.native and args.what == "stack":    # the race with the native step: its steps choose their own weights
        if args.compile or args.fixed_width is not None or args.consistent:
            raise ValueError("bench stack --native runs its own steps: drop --compile, --fixed-width and --consistent")
    elif (args.compile or args.native or args.fixed_width is not None or args.consistent) and \
            args.what not in ("speculative", "tree"):
        raise ValueError(f"--compile, --fixed-width and --consistent are for bench speculative and tree, --native "
                         f"for those and stack; bench {args.what} chooses its own steps")
    else:
        check_fixed_width(args)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    if args.json and args.what not in ("stack", "serve", "quant"):
        raise ValueError(f"--json is for bench stack, serve and quant; bench {args.what} prints tables only")
    if args.out is not None:  # checked now, not after minutes of measuring
        if args.what not in ("tree", "speculative", "serve"):
            raise ValueError(f"--out is for bench tree, speculative and serve; bench {args.what} writes its own "
                             f"results file")
        if not Path(args.out).resolve().parent.is_dir() or Path(args.out).is_dir():
            raise ValueError(f"--out {args.out}: not a file in an existing directory")
    if args.what == "serve":
        from ..bench.serve import bench_serve

        rates = []
        for rate in args.rates.split(","):
            try:
                rates.append(rate if rate == "burst" else float(rate))
            except ValueError:
                raise ValueError(f"--rates takes numbers or 'burst', comma-separated; got {rate!r}") from None
            if rate != "burst" and not rates[-1] > 0:
                raise ValueError(f"--rates must be > 0, got {rate!r}")
        if min(args.requests, args.clients, args.new_tokens) < 1:
            raise ValueError("--requests, --clients and --new-tokens must be >= 1")
        return tables_then_json(args, lambda: bench_serve(
            requests=args.requests, max_tokens=args.new_tokens, rates=rates, clients=args.clients,
            threads=args.threads, dtype=args.dtype, quant=args.quant, peer=not args.no_peer,
            **({"out": args.out} if args.out else {})))
    if args.what == "quant":
        import torch

        from ..bench.quant import bench_quant

        torch.set_num_threads(args.threads)
        return tables_then_json(args, lambda: bench_quant(eval_tokens=args.eval_tokens, new_tokens=args.new_tokens,
                                                          quality_only=args.quality_only))
    if args.what == "kv":
        import torch

        from ..bench.kv import bench_kv

        torch.set_num_threads(args.threads)
        bench_kv(quality=not args.no_quality)
    if args.what == "moe":
        from ..bench.moe import bench_dispatch
        from ..bench.timing import machine_settings, results_file, write_results

        write_results(dict(rows=bench_dispatch(), settings=dict(k=2, dim=256, hidden=256, **machine_settings())),
                      results_file("moe_results.json"))
    stack = dict(dtype=args.dtype, quant=args.quant, group_size=args.group_size, head=stack_head(args),
                 compile=args.compile, fixed_width=args.fixed_width, consistent=args.consistent, native=args.native)
    if args.what == "tree":
        from ..bench.tree import bench_tree

        bench_tree(new_tokens=args.new_tokens, threads=args.threads, stack=stack, out=args.out, repeats=args.repeats)
    if args.what == "kernels":  # chapter 7's Triton kernels vs PyTorch; needs a CUDA GPU
        from kernels.bench import main as bench_kernels

        return bench_kernels([])
    if args.what == "speculative":
        from ..bench.speculative import bench_speculative

        if not 1 <= args.draft_len <= 16:
            raise ValueError(f"--draft-len must be an int in [1, 16], got {args.draft_len}")
        bench_speculative(new_tokens=args.new_tokens, draft_len=args.draft_len, threads=args.threads, stack=stack,
                          out=args.out, repeats=args.repeats)
    if args.what == "stack":  # chapter 8: every technique stacked, raced against llama.cpp
        from ..bench.stack import bench_stack

        if args.native:
            from ..backends.native_step import available
            from ..backends.stack import NATIVE_STEPS
            from ..bench.timing import results_file

            if why := available():
                raise ValueError(f"bench stack --native: {why}")
            return tables_then_json(args, lambda: bench_stack(new_tokens=args.new_tokens, threads=args.threads,
                                                              repeats=args.repeats, steps=NATIVE_STEPS,
                                                              out=results_file("stack_results_native.json")))
        return tables_then_json(args, lambda: bench_stack(new_tokens=args.new_tokens, threads=args.threads,
                                                          repeats=args.repeats))
    if args.what == "tokenizer":
        from ..bench.tokenizer import bench_tokenizer

        bench_tokenizer()
    if args.what == "model":
        from ..bench.model import bench_model

        bench_model(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    return 0


def tables_then_json(args, run) -> int:
    """Run a bench; with --json its tables (and progress lines) go to stderr and its results, one JSON object, to
    stdout, the same object the bench writes to its results file."""
    if not args.json:
        run()
        return 0
    with contextlib.redirect_stdout(sys.stderr):
        result = run()
    print(json.dumps(result), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minillm", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter))
    add_sampling_args(sub.add_parser("generate", help="continue a prompt with SmolLM2-135M-Instruct"))
    add_sampling_args(sub.add_parser("chat", help="answer a message, wrapped in SmolLM2's chat template"))
    bench = sub.add_parser("bench", help="measure speed against a baseline in the same run")
    bench.add_argument("what", nargs="?", default="model", choices=["model", "quant", "kv", "moe", "tree", "kernels",
                                                                     "speculative", "tokenizer", "stack", "serve",
                                                                     "report"],
                       help="which chapter's benchmark (default: model); report: render data/*.json into "
                            "docs/RESULTS.md and the README's chapter table")
    bench.add_argument("--prompt-tokens", type=int, default=128, help="model: prompt length")
    bench.add_argument("--json", action="store_true",
                       help="stack, serve, quant: the results as one JSON object on stdout, the tables on stderr")
    bench.add_argument("--new-tokens", type=int, default=None,
                       help="tokens generated per timed run (default: 128 for stack, 32 for quant, 64 for the others, "
                            "as their committed figures)")
    bench.add_argument("--eval-tokens", type=int, default=1024, help="quant: held-out tokens for perplexity")
    bench.add_argument("--repeats", type=int, default=3,
                       help="stack, speculative, tree: timed rounds of every method (median)")
    bench.add_argument("--quality-only", action="store_true",
                       help="quant: recompute the perplexities only, keep the committed speed figures")
    bench.add_argument("--threads", type=int, default=None,
                       help="torch threads (default: 2 for serve, stack and quant, 1 for the others, as their committed "
                            "figures)")
    bench.add_argument("--requests", type=int, default=16, help="serve: requests per run")
    bench.add_argument("--clients", type=int, default=8, help="serve: requests in flight at most")
    bench.add_argument("--rates", default="0.5,1,burst", help="serve: Poisson arrival rates (requests/s), comma-separated; "
                       "burst: all at once")
    bench.add_argument("--out", default=None, help="tree, speculative: also write the results as JSON to this file; "
                       "serve: write them there instead of data/serve_results.json")
    bench.add_argument("--no-peer", action="store_true", help="serve: skip llama.cpp's server")
    bench.add_argument("--no-quality", action="store_true", help="kv: speed and memory only, skip the compression table")
    add_quant_args(bench, dtype_default=None)  # speculative, tree, serve: the model both sides decode with
    bench.add_argument("--compile", action="store_true", help="speculative, tree: compile the decode/verify steps")
    add_fixed_width_arg(bench)
    bench.add_argument("--draft-len", type=int, default=4,
                       help="speculative: tokens each drafter proposes per forward (default 4; with --fixed-width W "
                            "up to W - 1 cost the verify nothing more)")
    evaluate = sub.add_parser("eval", help="perplexity of SmolLM2 (optionally quantized) on a text file")
    add_quant_args(evaluate)
    evaluate.add_argument("--text", required=True, help="a UTF-8 text file, e.g. minillm/assets/heldout.txt")
    evaluate.add_argument("--context", type=int, default=512, help="tokens per evaluation window")
    evaluate.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    add_threads_arg(evaluate)
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching (chapter 9)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port)")
    serve.add_argument("--max-seqs", type=int, default=8, help="requests decoded together (default 8)")
    serve.add_argument("--max-batch-tokens", type=int, default=64,
                       help="tokens per step: decodes first, prompt chunks fill the rest (default 64)")
    serve.add_argument("--max-waiting", type=int, default=64, help="queued requests before 429 (default 64)")
    serve.add_argument("--policy", default="continuous", choices=["continuous", "static", "serial"],
                       help="continuous batching with chunked prefill (default), static batches, or one at a time")
    add_threads_arg(serve)
    add_quant_args(serve)
    quant = sub.add_parser("quantize", help="quantize SmolLM2 once and save it (generate --model PATH loads it)")
    add_quant_args(quant)
    quant.add_argument("--out", required=True, help="the .safetensors file to write")
    add_threads_arg(quant)
    from .train import add_train_args
    add_train_args(sub.add_parser("train", help="train a tiny model from scratch on a text file"))
    sub.add_parser("info", help="this machine as minillm sees it: CPU, which C++ kernels run, the choices remembered")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    for arg in argv:  # Linux hands undecodable bytes over as lone surrogates: refuse them here, by name
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return _fail(f"argument {arg!r} is not valid UTF-8", "--json" in argv)
    args = parser.parse_args(argv)
    json_errors = getattr(args, "json", False)
    try:
        if args.command in ("generate", "chat"):
            return cmd_generate(args, chat=args.command == "chat")
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "quantize":
            return cmd_quantize(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "train":
            from .train import cmd_train
            return cmd_train(args)
        if args.command == "info":
            return cmd_info()
        return cmd_bench(args)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        print("minillm: output closed by the reader; stopped", file=sys.stderr)
        return 141
    except KeyboardInterrupt:
        return _fail("interrupted", json_errors, 130)
    except (ValueError, OSError, ModelFileError) as e:  # bad input, a file that cannot be read, a bad model file
        kind = "" if isinstance(e, ModelFileError) or type(e) is ValueError else f"{type(e).__name__}: "
        return _fail(kind + str(e).splitlines()[0] if str(e) else type(e).__name__, json_errors)


def _fail(message: str, as_json: bool, code: int = 2) -> int:
    """One line, never a traceback: `error: ...` on stderr, or with --json `{"error": ...}` on stdout."""
    if as_json:
        print(json.dumps({"error": message}), flush=True)
    else:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
