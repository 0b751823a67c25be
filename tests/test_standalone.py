"""The package stands alone: what it reads at run time ships inside it, never the repository's data/."""
import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_module_builds_a_path_into_the_repository():
    upward = re.compile(r"__file__.*parents?\b.*[\"']data[\"']|parents\[\d\]\s*/\s*[\"']data[\"']")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "minillm").rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if upward.search(line)]
    assert not offenders, offenders


def test_every_asset_is_package_data():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = package_data["minillm.assets"]
    files = [p.name for p in (ROOT / "minillm" / "assets").iterdir() if p.is_file() and p.suffix != ".py"]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), files


def test_a_copy_of_the_package_alone_finds_its_files(tmp_path):
    """minillm/ copied where no data/ exists beside it: calibration text, Medusa heads, the draft model and the
    warm-up text all load, and a bench that would write its results says where instead of writing."""
    shutil.copytree(ROOT / "minillm", tmp_path / "minillm", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("from minillm.quant.calibration import calibration_parts; from minillm.decoding.medusa import HEADS, load_heads; "
            "from minillm.decoding import DISTILLED_DRAFT; from minillm.decoding.drafters import load_draft_model; "
            "from minillm.bench.speculative import WARM_TEXT; from minillm.bench.timing import results_file; "
            "assert list(calibration_parts()) == ['smollm2', 'shakespeare', 'code']; load_heads(HEADS); "
            "load_draft_model(DISTILLED_DRAFT); assert len(WARM_TEXT.read_text()) > 1000; "
            "assert results_file('x.json') is None; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_every_folder_of_the_package_is_listed_as_a_package():
    """setuptools warns (and may one day drop it) when a folder under minillm/ is importable but not listed."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.relative_to(ROOT).parts) for p in (ROOT / "minillm").rglob("*")
               if p.is_dir() and p.name != "__pycache__" and any(f.is_file() for f in p.iterdir())}
    assert folders <= listed, folders - listed
