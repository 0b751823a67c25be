"""Build minillm/assets/recycling_warm.txt: the text Token Recycling's matrix is filled from before the speculative and
tree benches time anything (chapter 6, `TokenRecycling.warm_up`).

Token Recycling keeps its adjacency matrix from one request to the next: a server that has answered chat
requests for a while guesses from what the model wrote in earlier answers. This text stands in for those
earlier answers: SmolLM2-135M-Instruct's own greedy answers (the benches decode greedily) to PROMPTS below,
varied chat requests on topics none of the benches' prompts touch (minillm/bench/speculative.py,
minillm/bench/tree.py; a test checks that no bench prompt is among them), 192 new tokens each, float32,
all decoded as one batch (make_calibration.smollm2_answers). Answers are separated by blank lines.

Usage (a data-making script, never run by tests; under a minute on 2 cores):
    python data/make_recycling_warm.py
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_calibration import smollm2_answers  # noqa: E402  (SmolLM2's answers to chat requests, one batch)

OUT = HERE.parent / "minillm" / "assets" / "recycling_warm.txt"  # shipped with the package
PROMPTS = [
    "How do volcanoes form?",
    "Write a short poem about the ocean at night.",
    "What is the difference between a crocodile and an alligator?",
    "Explain how a refrigerator keeps food cold.",
    "Give me a simple recipe for vegetable soup.",
    "Write a short story about a girl who discovers a hidden garden.",
    "What are the benefits of learning a second language?",
    "Explain what a budget is and how to make one.",
    "Describe the life cycle of a butterfly.",
    "How do airplanes stay in the air?",
    "Write a thank-you note to a teacher.",
    "What is the difference between a list and a tuple in Python?",
    "Explain how vaccines train the immune system.",
    "What were the main causes of the First World War?",
    "Give advice to someone starting their first job.",
    "Describe how a bill becomes a law in a democracy.",
    "Write a short fable about a fox and a crow.",
    "How does the moon affect the tides?",
    "What should a beginner know before adopting a dog?",
    "Explain what an API is, with an example.",
    "Describe the city of Rome to someone who has never been there.",
    "How do solar panels turn sunlight into electricity?",
    "Write a short dialogue between a shopkeeper and a customer.",
    "What makes a good team leader?",
]


def main() -> None:
    text = "\n\n".join(smollm2_answers(PROMPTS, 192, temperature=0.0)) + "\n"
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(text.encode()):,d} bytes, {len(PROMPTS)} answers)")


if __name__ == "__main__":
    main()
