"""pyproject.toml and environment.yml pin the same packages at the same versions."""
import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pins(lines):
    out = {}
    for line in lines:
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)==([^;\s]+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += extra
    ours = pins(declared)
    env_lines = [l.strip().removeprefix("- ") for l in (ROOT / "environment.yml").read_text().splitlines()
                 if l.strip().startswith("- ") and "==" in l]
    conda = pins(env_lines)
    assert ours == conda
    assert ours["torch"] == "2.13.0"
    assert len(declared) == len(ours), "every dependency is pinned with =="
