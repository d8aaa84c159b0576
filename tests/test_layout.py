"""The package layout: one import namespace (`grpo`), its three layers, and no top-level name
of ours that shadows another installed distribution (a top-level `kernels` package once hid
Hugging Face's `kernels`, which transformers >= 5.25 imports as soon as a model is built)."""

import ast
import fnmatch
import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
DIST = "grpo-triton"
# Folders of the checkout that hold our Python code (what a scan of imports covers).
CODE_DIRS = ("grpo", "tests", "benchmarks", "examples")


def _normalise(dist: str) -> str:
    return dist.lower().replace("_", "-").replace(".", "-")


def _modules(top: str) -> list[tuple[str, Path]]:
    """(dotted module name, path) of every .py file under ROOT/top."""
    out = []
    for path in sorted((ROOT / top).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _imports(module: str, path: Path) -> set[str]:
    """Absolute names of the modules that `path` imports, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            # `from grpo import kernels` imports the module grpo.kernels.
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def _ours(names: set[str]) -> set[str]:
    return {n for n in names if n == "grpo" or n.startswith("grpo.")}


def _wheel_top_level() -> set[str]:
    """Top-level import names the wheel installs, from pyproject's package discovery."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = find["packages"]["find"]["include"]
    return {
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").is_file()
        and any(fnmatch.fnmatch(p.name, pattern) for pattern in include)
    }


@pytest.mark.parametrize("module,path", _modules("grpo/kernels"), ids=lambda v: str(v))
def test_kernels_import_nothing_else_of_ours(module, path):
    ours = _ours(_imports(module, path))
    outside = sorted(n for n in ours if n != "grpo" and not n.startswith("grpo.kernels"))
    assert not outside and "grpo" not in ours, f"{path.relative_to(ROOT)} imports {outside}"


@pytest.mark.parametrize("module,path", _modules("grpo/models"), ids=lambda v: str(v))
def test_models_import_only_kernels(module, path):
    ours = _ours(_imports(module, path))
    allowed = ("grpo.kernels", "grpo.models")
    outside = sorted(n for n in ours if n != "grpo" and not n.startswith(allowed))
    assert not outside, f"{path.relative_to(ROOT)} imports {outside}"


def test_no_old_top_level_imports():
    """`kernels` and `models` are grpo.kernels and grpo.models: no alias, no old import."""
    found = []
    for top in CODE_DIRS:
        if not (ROOT / top).is_dir():
            continue
        for module, path in _modules(top):
            old = {n for n in _imports(module, path) if n.split(".")[0] in ("kernels", "models")}
            found += [f"{path.relative_to(ROOT)}: {n}" for n in sorted(old)]
    assert not found, "old top-level imports:\n" + "\n".join(found)
    assert not (ROOT / "kernels").exists() and not (ROOT / "models").exists()


def test_wheel_installs_only_grpo():
    assert _wheel_top_level() == {"grpo"}
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{DIST} is not installed")
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        assert set(top_level.split()) == {"grpo"}


def test_no_top_level_name_shadows_an_installed_distribution():
    """Neither what the wheel installs nor the checkout's own top-level packages (on sys.path
    first when run from the root) may be a name another installed distribution provides."""
    checkout = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    provided = importlib.metadata.packages_distributions()
    clashes = {}
    for name in sorted(_wheel_top_level() | checkout):
        others = {d for d in provided.get(name, []) if _normalise(d) != DIST}
        if others:
            clashes[name] = sorted(others)
    assert not clashes, f"top-level names of ours that installed distributions provide: {clashes}"


def _run(code: str) -> subprocess.CompletedProcess:
    # From the checkout's root with `python -c`: the root is first on sys.path, as for pytest,
    # `python -m grpo.cli.train` and the editable install, which is where the clash bit.
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_grpo_kernels_stays_light():
    done = _run("""
        import sys
        import grpo
        assert "torch" not in sys.modules, "import grpo imported torch"
        import grpo.kernels
        heavy = [m for m in ("transformers", "peft", "grpo.models", "grpo.trainer", "grpo.build")
                 if m in sys.modules]
        assert not heavy, f"import grpo.kernels imported {heavy}"
    """)
    assert done.returncode == 0, done.stderr


def test_transformers_builds_a_model_beside_hugging_face_kernels(tmp_path):
    """transformers' model code imports transformers.integrations.hub_kernels, which imports
    Hugging Face's `kernels` when installed (transformers >= 5.25 depends on it): ours must not
    be what it finds. Both our loader and transformers' own from_pretrained build the model."""
    done = _run(f"""
        import importlib.metadata, importlib.util, sys
        import torch
        import transformers.integrations.hub_kernels  # noqa: F401
        from transformers import AutoModelForCausalLM
        from grpo.models import load_model, make_tiny

        make_tiny({str(tmp_path / "tiny")!r}, kind="dense")
        model, tok = load_model({str(tmp_path / "tiny")!r}, dtype=torch.float32)
        hf = AutoModelForCausalLM.from_pretrained({str(tmp_path / "tiny")!r})
        ids = torch.tensor([tok.encode("1+2=")])
        assert torch.allclose(model(ids).logits, hf(ids).logits, atol=1e-5)
        try:
            version = importlib.metadata.version("kernels")
        except importlib.metadata.PackageNotFoundError:
            version = None
        spec = importlib.util.find_spec("kernels")
        if version is not None:
            origin = spec.origin or ""
            assert "site-packages" in origin, f"kernels resolves to {{origin}}"
        print("hf kernels", version)
    """)
    assert done.returncode == 0, done.stderr


def _python_snippets() -> list[tuple[str, str]]:
    """(file:line, code) of every ```python block of the README and docs/."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines, start = path.read_text().splitlines(), None
        for i, line in enumerate(lines):
            if start is None and line.strip() == "```python":
                start = i + 1
            elif start is not None and line.strip() == "```":
                out.append((f"{path.relative_to(ROOT)}:{start}", "\n".join(lines[start:i])))
                start = None
    return out


@pytest.mark.parametrize("where,code", _python_snippets(), ids=lambda v: v.split("\n")[0])
def test_documented_snippets_run_as_written(where, code, tmp_path):
    """Each snippet runs as a user would paste it: a new interpreter in an empty directory,
    the kernels on their CPU reference path (no interpreter flag)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{where}:\n{done.stderr[-3000:]}"


def _graph() -> dict[str, set[str]]:
    """Module -> our modules it imports at module level. Importing a.b.c runs a/__init__ and
    a/b/__init__ first, so each import also reaches the packages above the target."""
    modules = dict(_modules("grpo"))
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for name in _ours(_imports(module, path)):
            while name and name not in modules:  # `from grpo.x import f`: the module grpo.x
                name = name.rpartition(".")[0]
            parts = name.split(".")
            edges.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        graph[module] = {e for e in edges if e in modules and e != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    """Imports run downward only. A package's __init__ that imports its own submodules is not
    a circle (the package is their parent), so edges from a module to its parents are left
    out of the search; an import of a.b.c counts as an import of a.b's __init__ too."""
    graph = _graph()
    downward = {m: {e for e in edges if not m.startswith(e + ".")} for m, edges in graph.items()}
    assert _cycles(downward) == []


def test_no_imports_of_our_modules_inside_functions():
    found = []
    for _, path in _modules("grpo"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.level:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = (
                        [a.name for a in node.names]
                        if isinstance(node, ast.Import)
                        else [node.module or ""]
                    )
                    if _ours(set(names)):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, "imports of our own modules inside functions: " + ", ".join(found)


def test_no_noqa_e402():
    found = [str(p.relative_to(ROOT)) for _, p in _modules("grpo") if "noqa: E402" in p.read_text()]
    assert not found, f"module-level imports below code: {found}"
