"""Build minillm/assets/heldout.txt (modern English prose, from Flask's documentation) and
minillm/assets/heldout_code.txt (Python source, Flask's own modules): two held-out texts of different domains.

Provenance
----------
Source: the PyPI source distribution `flask==3.0.3`, file flask-3.0.3.tar.gz,
sha256 ceb27b0af3823ea2737928a4d99d125a06175b8512c445cbd9a9ce200ef76842.
Licence: BSD-3-Clause, "Copyright 2010 Pallets" (LICENSE.txt in the sdist; the full text is
reproduced in data/README.md, as the licence asks of redistributions).

Why this text: it is contemporary technical English written as explanations (why Flask is
designed the way it is, how a request is processed, what web-security pitfalls are), not
Shakespeare; it comes with a permissive licence; and a pinned sdist rebuilds it byte for byte
offline from a local PyPI mirror. It is "held out" from the tiny model's Shakespeare training;
it is NOT guaranteed unseen by SmolLM2 (Flask's docs are on the public web), so its perplexity
is for comparing variants of one model (float32 vs quantized, cached vs not), not a benchmark.

What is kept: the prose of the reStructuredText pages in DOCS below, in that order, converted
to plain text: section titles kept (underlines dropped); code examples (`::` literal blocks and
`code-block` directives) and other directives (toctree, autofunction, ...) dropped, except the
bodies of note/warning/admonition boxes, which are prose; inline markup reduced to its text
(:class:`~flask.Flask` -> Flask, ``g`` -> g, `link <url>`_ -> link). Non-ASCII characters
are kept as they are (the text is UTF-8).

heldout_code.txt: the Python modules in CODE below, from src/flask/ of the same sdist, as they are
(a header line `# file: src/flask/NAME` before each). It is the second domain chapter 3's GPTQ and
AWQ are evaluated on; their calibration text (minillm/assets/calibration.txt) holds other code (requests).

Usage (a data-making script, never run by tests):
    python data/prepare_heldout.py                        # pip-downloads the sdist to a temp dir
    python data/prepare_heldout.py path/to/flask-3.0.3.tar.gz
"""
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "flask-3.0.3.tar.gz"
SDIST_SHA256 = "ceb27b0af3823ea2737928a4d99d125a06175b8512c445cbd9a9ce200ef76842"
OUT = Path(__file__).resolve().parents[1] / "minillm" / "assets" / "heldout.txt"  # shipped with the package
OUT_CODE = Path(__file__).resolve().parent / "heldout_code.txt"
CODE = ["app.py", "ctx.py", "helpers.py", "blueprints.py", "config.py"]
DOCS = ["design.rst", "lifecycle.rst", "appcontext.rst", "reqcontext.rst", "web-security.rst",
        "async-await.rst", "extensiondev.rst"]
PROSE_DIRECTIVES = {"note", "warning", "admonition", "tip", "important", "attention", "caution"}


def strip_inline(text: str) -> str:
    """Inline reST markup (may span lines) -> its text: ':meth:`~flask.Flask.open_resource`' -> 'open_resource'."""
    text = re.sub(r":\w+:`([^`<]*?)\s*<[^`>]*>`", r"\1", text)            # :ref:`text <target>`
    text = re.sub(r":doc:`[^`]*?([\w-]+)`", lambda m: m[1].replace("-", " "), text)  # :doc:`/a/b-c`
    text = re.sub(r":pep:`(\d+)`", r"PEP \1", text)
    text = re.sub(r":\w+:`~?\.?([^`]*?)`", lambda m: m[1].split(".")[-1] if "~" in m[0] else m[1], text)
    text = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", text)               # `text <url>`_
    text = re.sub(r"``([^`]+)``", r"\1", text)                             # ``literal``
    text = re.sub(r"`([^`]+)`_?", r"\1", text)                             # `default role`
    return text


def rst_to_text(rst: str) -> str:
    lines, out, i = rst.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        directive = re.match(r"\.\. ([\w-]+)::", line.strip())
        if directive or line.startswith(".. "):                      # directive or comment
            body_indent = len(line) - len(line.lstrip()) + 1
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) >= body_indent):
                body.append(lines[i])
                i += 1
            if directive and directive[1] in PROSE_DIRECTIVES:
                kept = [b.strip() for b in body if not b.strip().startswith(":")]
                out.extend(kept)
            continue
        if re.fullmatch(r"([=\-~^\"'*+#])\1{2,}", line.strip()):       # section underline
            i += 1
            continue
        if line.rstrip().endswith("::"):                              # literal block follows
            text = line.rstrip()[:-2].rstrip()
            if text:
                out.append(text + ":")
            indent = len(line) - len(line.lstrip())
            i += 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                i += 1
            out.append("")
            continue
        out.append(line.strip())
        i += 1
    text = strip_inline("\n".join(out))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def build(sdist: Path) -> tuple[str, str]:
    """-> (prose of the docs pages, source of the modules)."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ValueError(f"{sdist} has sha256 {digest}; expected {SDIST_SHA256} (flask==3.0.3)")
    with tarfile.open(sdist) as tar:
        pages = [rst_to_text(tar.extractfile(f"flask-3.0.3/docs/{name}").read().decode("utf-8"))
                 for name in DOCS]
        modules = [f"# file: src/flask/{name}\n" + tar.extractfile(f"flask-3.0.3/src/flask/{name}").read().decode("utf-8")
                   for name in CODE]
    return "\n\n".join(pages), "\n".join(modules)


def download(dest: str) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--dest", dest, "flask==3.0.3"], check=True)
    return Path(dest) / SDIST


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        text, code = build(Path(argv[0]) if argv else download(tmp))
    OUT.write_text(text, encoding="utf-8")
    OUT_CODE.write_text(code, encoding="utf-8")
    print(f"wrote {OUT} ({len(text.encode()):,d} bytes from {len(DOCS)} pages) and {OUT_CODE} "
          f"({len(code.encode()):,d} bytes from {len(CODE)} modules)")


if __name__ == "__main__":
    main(sys.argv[1:])
