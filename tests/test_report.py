"""bench report: docs/RESULTS.md and the README's chapter table are rendered from data/, never typed by hand."""
import json
import re
import shutil
from pathlib import Path

import pytest

from minillm.bench.report import BEGIN, CHAPTERS, END, chapter_table, render, write_report

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def kernels_measured():
    return "No GPU measurements" not in (ROOT / "kernels" / "BENCHMARKS.md").read_text()


def test_committed_report_and_readme_table_match_the_results_files():
    text, plots, headlines = render(ROOT / "data")
    assert (ROOT / "docs" / "RESULTS.md").read_text() == text, "docs/RESULTS.md is stale: python -m minillm bench report"
    assert chapter_table(headlines, kernels_measured()) in README, "README's chapter table is stale: bench report"
    for name in plots:
        assert (ROOT / "docs" / name).is_file(), name
    assert len(CHAPTERS) == len(list((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")))


def test_readme_is_a_front_page():
    assert len(README.encode()) < 12_000
    for line in ("make lab", "make test"):
        assert line in README


def test_readme_layout_names_every_module_and_folder():
    layout = README[README.index("## Layout"):README.index("## Where things come from")]
    package = ROOT / "minillm"
    names = [p.stem for p in package.glob("*.py") if p.stem != "__init__"]
    names += [p.name + "/" for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"]
    names += [d + "/" for d in ("kernels", "notebooks", "data", "docs", "tests")]
    missing = [n for n in names if not re.search(re.escape(n if n.endswith("/") else n + ".py") + r"(?![\w])", layout)]
    assert not missing, f"README's layout does not name {missing}"


def test_report_writes_docs_plots_and_the_readme_block(tmp_path):
    for folder in ("data", "kernels"):
        (tmp_path / folder).mkdir()
    shutil.copy(ROOT / "data" / "serve_results.json", tmp_path / "data")
    shutil.copy(ROOT / "kernels" / "BENCHMARKS.md", tmp_path / "kernels")
    (tmp_path / "README.md").write_text(f"# x\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    assert write_report(tmp_path, log=lambda *a: None) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "old" not in readme and readme.endswith("after\n") and "continuous batching" in readme
    assert "no results file yet (`python -m minillm bench quant`)" in readme
    png = (tmp_path / "docs" / "serve_results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_results_file_it_cannot_read_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "serve_results.json").write_text(json.dumps({"rows": [{"server": "x"}]}))
    with pytest.raises(ValueError, match=r"serve_results\.json: not a serve results file"):
        render(tmp_path / "data")
