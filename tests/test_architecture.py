"""The package's shape, read from the source (nothing is imported): the rules docs/architecture.md states.

Every `import` counts, the ones inside functions too: a lazy import still ties two modules together.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "flux3d"
# Per-asset work and model code run inside any executor; only executors/ and flows/ know Ray and Prefect.
ENGINE_FREE = ("stages", "curation", "features", "shards", "sources", "models")
ENGINES = ("prefect", "ray")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Every module (flux3d or not) that `name` imports, at any depth of the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            # `from flux3d.x import y` imports the module flux3d.x.y when y is one
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_no_import_cycle_among_flux3d_modules():
    graph = _graph()
    edges = {a: {b for b in deps if b in graph and b != a and not a.startswith(b + ".")} for a, deps in graph.items()}
    # A package's __init__ imported by its own submodule is Python's doing, not a cycle of ours: dropped above.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_per_asset_and_model_code_never_imports_prefect_or_ray():
    offenders = []
    for name, deps in _graph().items():
        room = name.split(".")[1] if "." in name else ""
        if room in ENGINE_FREE:
            offenders += [f"{name} imports {d}" for d in deps if d.split(".")[0] in ENGINES]
    assert not offenders, offenders


def test_models_never_import_training_or_the_pipeline():
    offenders = [f"{name} imports {d}" for name, deps in _graph().items() if name.startswith("flux3d.models")
                 for d in deps if d.startswith(("flux3d.training", "flux3d.flows", "flux3d.evaluation"))]
    assert not offenders, offenders


def test_every_node_declares_what_its_stage_carries(tmp_path):
    """The registry's params and columns are the built stage's (building needs no model: setup is lazy)."""
    from flux3d.config.load import load_config
    from flux3d.pipeline.registry import STAGES, build

    cfg = load_config(None, {"storage.root": str(tmp_path)})
    for name, node in STAGES.items():
        stage, _ = build(name, cfg)
        assert stage.name == name
        assert stage.params == node.params(cfg), name
        assert stage.columns == node.columns, name


def test_per_asset_code_never_reads_the_catalog_and_training_never_reads_stages():
    offenders = []
    for name, deps in _graph().items():
        room = name.split(".")[1] if "." in name else ""
        if room in ENGINE_FREE:
            offenders += [f"{name} imports {d}" for d in deps
                          if d == "flux3d.catalog" or d.startswith("flux3d.pipeline")]
        if room == "training":
            offenders += [f"{name} imports {d}" for d in deps if d.startswith("flux3d.stages")]
    assert not offenders, offenders


def test_config_code_never_imports_torch():
    """Reading a config must stay cheap: the CLI's help, and every isolated child that unpickles a stage config,
    import `flux3d.config`. With torch behind it (3+ s) a child could time out before it even started its work."""
    graph = _graph()
    offenders = []
    for start in (name for name in graph if name.startswith("flux3d.config")):
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            offenders += [f"{start} -> ... -> {name} imports {d}" for d in graph[name] if d.split(".")[0] == "torch"]
            todo += [d for d in graph[name] if d in graph]
    assert not offenders, offenders
