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


def test_the_public_api_is_annotated():
    """Every function `import minillm` exports says what it takes and returns (keyword catch-alls aside)."""
    import inspect

    import minillm

    for name in minillm.__all__:
        fn = getattr(minillm, name)
        if not inspect.isfunction(fn):
            continue
        sig = inspect.signature(fn)
        bare = [p for p, v in sig.parameters.items() if v.annotation is inspect.Parameter.empty
                and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
        assert not bare, f"minillm.{name}: parameters without a type hint: {bare}"
        assert sig.return_annotation is not inspect.Signature.empty, f"minillm.{name}: no return type"
