"""The package's layers point one way: no import cycle (function-local imports count), every import goes down
the README's list of layers, the model never imports chapter 7's kernels, and importing `kernels` leaves every other
module as it was."""
import re
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_graph(packages=("minillm", "kernels")) -> dict[str, set[str]]:
    """module -> package modules it imports anywhere in its file (a package's __init__ re-exporting
    its own children is not counted: that is not a dependency of design)."""
    files = {}
    for pkg in packages:
        for f in (ROOT / pkg).rglob("*.py"):
            files[".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = f
    graph = {}
    for name, f in files.items():
        is_pkg = f.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = name.split(".")
                if node.level:
                    base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != name and not (is_pkg and t.startswith(name + ".")):
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph):
    """A list of modules forming a cycle, or None (depth-first search)."""
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = "done"
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_model_and_techniques_do_not_import_kernels_or_benchmarks():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("minillm") and not name.startswith("minillm.cli"):
            assert not any(d.startswith("kernels") for d in deps), f"{name} imports chapter 7's kernels"
        if name.startswith("minillm") and not name.startswith(("minillm.bench", "minillm.cli")):
            assert not any(d.startswith("minillm.bench") for d in deps), f"{name} imports a benchmark"


def test_importing_kernels_touches_no_other_module():
    code = ("import sys, torch\nfrom minillm import Transformer, tiny\n"
            "with torch.device('meta'): Transformer(tiny())\n"
            "before = dict(sys.modules)\nimport kernels\n"
            "changed = [n for n, m in before.items() if sys.modules.get(n) is not m]\n"
            "print(changed, kernels.triton_unavailable_reason() is None)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    changed, usable = out.stdout.split("] ")
    assert changed == "[", f"import kernels replaced modules: {changed}]"
    assert usable.strip() in ("True", "False")  # False: triton came first without the interpreter, and it says so


def readme_layers() -> list[str]:
    """The layers the README's Layout section lists under minillm/, top to bottom (`name/` or `a.py, b.py`)."""
    block = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    lines = block.split("minillm/", 1)[1].splitlines()[1:]
    names = []
    for line in lines:
        if not line.startswith("  ") or line.startswith("    "):
            break
        head = re.split(r"\s{2,}", line.strip())[0]
        names += [n.strip().removesuffix("/").removesuffix(".py") for n in head.split(",")]
    return names


def layer_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "minillm"


def test_readme_layout_is_the_tree():
    listed = readme_layers()
    pkg = ROOT / "minillm"
    folders = {d.name for d in pkg.iterdir() if (d / "__init__.py").exists()}
    files = {f.stem for f in pkg.glob("*.py") if f.stem != "__init__"}
    assert sorted(listed) == sorted(folders | files), "README's Layout differs from minillm/'s folders and files"


def upward_imports(graph: dict[str, set[str]], order: list[str]) -> list[str]:
    """Imports from one layer to one that is not below it in `order` (top to bottom)."""
    rank = {name: i for i, name in enumerate(order)}
    upward = []
    for name, deps in graph.items():
        here = layer_of(name)
        if here == "minillm":  # the package's front door sits above all
            continue
        for dep in deps:
            there = layer_of(dep)
            if there != here and (there not in rank or rank[there] <= rank[here]):
                upward.append(f"{name} ({here}) imports {dep} ({there})")
    return sorted(upward)


def test_every_import_goes_down_the_layers():
    upward = upward_imports(import_graph(("minillm",)), readme_layers())
    assert not upward, "imports that do not go down the layers: " + "; ".join(upward)


def test_layers_check_catches_an_upward_import():
    order = ["decoding", "model", "native"]
    assert upward_imports({"minillm.decoding.loop": {"minillm.model.llama", "minillm.native.logits"}}, order) == []
    assert upward_imports({"minillm.model.llama": {"minillm.decoding.loop"}}, order) == [
        "minillm.model.llama (model) imports minillm.decoding.loop (decoding)"]
    assert upward_imports({"minillm.model.llama": {"minillm.extra.x"}}, order) == [
        "minillm.model.llama (model) imports minillm.extra.x (extra)"]
