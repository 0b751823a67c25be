"""Build minillm/assets/calibration.txt: the text GPTQ and AWQ calibrate on (chapter 3), a mixture of three parts.

1. "smollm2": SmolLM2-135M-Instruct's own answers to PROMPTS below (varied instructions: science,
   history, how-to, stories, advice, code), sampled at temperature 0.7, top-p 0.9, seed 0, 160 new
   tokens each, all prompts decoded as one batch of different lengths (minillm.decode with a list
   of prompts). Text the model itself writes is what the GPTQ/AWQ literature calls
   self-generated calibration data: no download, and the model's own distribution.
2. "shakespeare": 12 passages of 1,000 characters from data/shakespeare.txt, evenly spaced across
   the plays.
3. "code": the start of four modules of the PyPI sdist `requests==2.32.3` (requests-2.32.3.tar.gz,
   sha256 55365417734eb18255590a9ff9eb97e9e1da868d4ccd6402399eaf68af20a760; Apache-2.0, see
   data/README.md), 3,000 characters each.

None of it overlaps the evaluation texts: minillm/assets/heldout.txt (Flask's docs) and minillm/assets/heldout_code.txt
(Flask's modules). Each part starts with a line `### part: NAME`; minillm.quant.calibration_ids
takes an equal number of windows from each part.

Usage (a data-making script, never run by tests; ~1 minute on 2 cores):
    python data/make_calibration.py                       # pip-downloads the requests sdist to a temp dir
    python data/make_calibration.py path/to/requests-2.32.3.tar.gz
"""
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from minillm.decoding import decode  # noqa: E402
from minillm.model.loading import load_pretrained  # noqa: E402

OUT = HERE.parent / "minillm" / "assets" / "calibration.txt"  # shipped with the package
SDIST, SDIST_SHA256 = "requests-2.32.3.tar.gz", "55365417734eb18255590a9ff9eb97e9e1da868d4ccd6402399eaf68af20a760"
MODULES = ["sessions.py", "models.py", "adapters.py", "utils.py"]
PROMPTS = [
    "Explain how photosynthesis works to a curious twelve-year-old.",
    "What caused the fall of the Western Roman Empire? Give three reasons.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "How do I make a sourdough starter at home?",
    "Describe the water cycle in a few paragraphs.",
    "What are the main differences between a virus and a bacterium?",
    "Give me tips for preparing for a job interview.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "Summarize the plot of a classic adventure novel of your choice.",
    "Why is the sky blue?",
    "Write a polite email asking a landlord to fix a broken heater.",
    "Explain what inflation is and how central banks respond to it.",
    "What should I pack for a week-long hiking trip?",
    "Write a haiku sequence about autumn in the city.",
    "How does a computer store numbers in memory?",
    "Explain the rules of chess for a beginner.",
    "What is the difference between weather and climate?",
    "Write a SQL query that finds the ten customers with the largest total orders, and explain it.",
    "Describe a typical day in the life of a medieval farmer.",
    "How can I improve my sleep?",
    "Explain recursion with a simple example in JavaScript.",
    "What are black holes, and how do we know they exist?",
    "Write a dialogue between a cat and a dog arguing about who is the better pet.",
    "Give a step-by-step guide to changing a flat bicycle tire.",
]


def smollm2_answers(requests=PROMPTS, new_tokens: int = 160, **sampling) -> list[str]:
    """SmolLM2's (float32) answers to chat `requests`, decoded as one batch; `sampling`: decode's options, by
    default this file's (temperature 0.7, top-p 0.9, seed 0). make_recycling_warm.py calls it greedy."""
    model, tok = load_pretrained("smollm2-135m")
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in requests]
    rows = decode(model, prompts, new_tokens, **(sampling or dict(temperature=0.7, top_p=0.9, seed=0))).rows
    eos = model.config.eos_token_id
    return [tok.decode([t for t in row if t != eos]).strip() for row in rows]


def shakespeare_passages(n: int = 12, chars: int = 1000) -> list[str]:
    text = (HERE / "shakespeare.txt").read_text()
    return [text[i * (len(text) - chars) // n:][:chars] for i in range(n)]


def code_excerpts(sdist: Path, chars: int = 3000) -> list[str]:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(f"{sdist} has sha256 {digest}; expected {SDIST_SHA256} (requests==2.32.3)")
    with tarfile.open(sdist) as tar:
        return [tar.extractfile(f"requests-2.32.3/src/requests/{name}").read().decode("utf-8")[:chars]
                for name in MODULES]


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if argv:
            sdist = Path(argv[0])
        else:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "--dest", tmp, "requests==2.32.3"], check=True)
            sdist = Path(tmp) / SDIST
        parts = {"smollm2": smollm2_answers(), "shakespeare": shakespeare_passages(), "code": code_excerpts(sdist)}
    text = "".join(f"### part: {name}\n" + "\n\n".join(pieces) + "\n" for name, pieces in parts.items())
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(text.encode()):,d} bytes: " +
          ", ".join(f"{k} {sum(map(len, v)):,d} chars" for k, v in parts.items()) + ")")


if __name__ == "__main__":
    main(sys.argv[1:])
