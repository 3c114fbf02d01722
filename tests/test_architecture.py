"""The package layers: imports only point down, and no pass imports another pass (DESIGN.md, "Layers")."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top: a package may import only itself and the packages before it.
LAYERS = ("core", "zoo", "calibration", "verify", "backends", "passes", "search", "bench", "serving", "optimizer")
PASS_INFRASTRUCTURE = {"analyses", "base", "manager", "quantization"}  # passes/ modules that are not passes


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module an import statement in `path` names, wherever it sits (functions, TYPE_CHECKING too)."""
    found = set()
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def package_graph(root: Path = ROOT) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {p: set() for p in LAYERS}
    for package in LAYERS:
        for path in (root / package).rglob("*.py"):
            graph[package] |= {m.split(".")[0] for m in imported_modules(path, root)} & set(LAYERS)
        graph[package].discard(package)
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{package} imports {other}"
        for package, imports in graph.items()
        for other in sorted(imports)
        if LAYERS.index(other) > LAYERS.index(package)
    ]


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Our modules (one per file; a package's __init__ is the package) and the modules of ours each imports,
    anywhere in the file (the longest of ours an import names: `from core.adapters import x` is core.adapters)."""
    files = {}
    for package in LAYERS:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        graph[name] = set()
        for imported in imported_modules(path, root):
            parts = imported.split(".")
            ours = next((m for i in range(len(parts), 0, -1) if (m := ".".join(parts[:i])) in files), None)
            if ours is not None and ours != name:
                graph[name].add(ours)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_imports_only_point_down() -> None:
    assert upward_imports(package_graph()) == []


def test_the_package_graph_has_no_cycle() -> None:
    assert find_cycle(package_graph()) is None


def test_no_module_imports_itself_through_others() -> None:
    """No file-level cycle, lazy and type-only imports included: modules import down within a package too."""
    assert find_cycle(module_graph()) is None


def test_no_pass_imports_another_pass() -> None:
    passes = {p.stem for p in (ROOT / "passes").glob("*.py")} - {"__init__", *PASS_INFRASTRUCTURE}
    offenders = []
    for name in passes:
        imported = imported_modules(ROOT / "passes" / f"{name}.py")
        others = {m.split(".")[1] for m in imported if m.startswith("passes.") and m.count(".") >= 1}
        offenders += [f"passes.{name} imports passes.{o}" for o in sorted(others & passes - {name})]
    assert not offenders, offenders


def test_the_guard_sees_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    """The checks above fail on a planted violation (guards the guard)."""
    for package in LAYERS:
        (tmp_path / package).mkdir()
    (tmp_path / "core" / "probe.py").write_text("def f():\n    from optimizer.job import run_job\n")
    (tmp_path / "optimizer" / "job.py").write_text("from .stages import x\nfrom core import probe\n")
    graph = package_graph(tmp_path)
    assert upward_imports(graph) == ["core imports optimizer"]
    assert find_cycle(graph) == ["core", "optimizer", "core"]
    # Within one package, a lazy import back is still a cycle of files.
    (tmp_path / "core" / "probe.py").write_text("from core import ir\n")
    (tmp_path / "core" / "ir.py").write_text("def f():\n    from core.probe import g\n")
    (tmp_path / "optimizer" / "job.py").write_text("from core import ir\n")
    assert find_cycle(package_graph(tmp_path)) is None
    assert find_cycle(module_graph(tmp_path)) == ["core.ir", "core.probe", "core.ir"]


def test_python_dash_m_sees_every_command() -> None:
    """`python -m optimizer.cli CMD` runs the package's __main__, after the package registered every command
    module; the package imports each command module of its folder."""
    package = ROOT / "optimizer" / "cli"
    tree = ast.parse((package / "__main__.py").read_text())
    assert [ast.unparse(n) for n in tree.body if isinstance(n, ast.ImportFrom)] == ["from optimizer.cli import main"]
    init = ast.parse((package / "__init__.py").read_text())
    imports = [n for n in init.body if isinstance(n, ast.ImportFrom) and n.module == "optimizer.cli"]
    imported = {alias.name for node in imports for alias in node.names}
    commands = {p.stem for p in package.glob("*.py")} - {"__init__", "__main__", "app"}
    assert commands and commands <= imported


def family_names(root: Path = ROOT) -> set[str]:
    """Every family's name, model class and block-stack attribute, read from the adapter files' source
    (`ADAPTER = SomeAdapter("family", "ModelClass")`, `block_stack: ... = "attribute"`)."""
    names = set()
    for path in (root / "core" / "adapters").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["ADAPTER"]:
                names.update(a.value for a in node.value.args if isinstance(a, ast.Constant))
            stack = isinstance(node, ast.AnnAssign) and ast.unparse(node.target) == "block_stack"
            if stack and isinstance(node.value, ast.Constant) and node.value.value:
                names.add(node.value.value)
    return names


TECHNIQUES = ("passes", "core/caching.py", "core/cache_variants.py")


def family_mentions(root: Path = ROOT) -> list[str]:
    """Where the techniques' source names a family, model class or block-stack attribute."""
    names, found = family_names(root), []
    for technique in TECHNIQUES:
        path = root / technique
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Constant) and node.value in names:
                    found.append(f"{file.relative_to(root)}:{node.lineno} {node.value!r}")
                elif isinstance(node, ast.Attribute) and node.attr in names:
                    found.append(f"{file.relative_to(root)}:{node.lineno} .{node.attr}")
    return found


def test_techniques_read_family_descriptions_never_family_names(tmp_path) -> None:
    """Caching, pruning, layer removal, linearization and quantization know families only through their
    adapters' descriptions: no family name, model class or block-stack attribute in their source."""
    assert {"dit", "DiTTransformer2DModel", "transformer_blocks", "sd-unet"} <= family_names()
    assert family_mentions() == []
    # The guard finds a planted mention.
    (tmp_path / "core" / "adapters").mkdir(parents=True)
    (tmp_path / "passes").mkdir()
    (tmp_path / "core" / "caching.py").write_text("")
    (tmp_path / "core" / "cache_variants.py").write_text("")
    (tmp_path / "core" / "adapters" / "x.py").write_text(
        'class X:\n    block_stack: str = "layers"\n\n\nADAPTER = X("x-family", "XModel")\n'
    )
    (tmp_path / "passes" / "p.py").write_text('def f(m, s):\n    return m.layers if s == "x-family" else None\n')
    assert family_mentions(tmp_path) == ["passes/p.py:2 .layers", "passes/p.py:2 'x-family'"]
