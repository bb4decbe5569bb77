"""The layers of the architecture (README, Architecture): imports run one way, lazy imports included.

The graph is read from the source (every `import` statement, at module top or inside a function; the
`if TYPE_CHECKING:` blocks, which never run, are left out), so an import added inside a function to dodge
a cycle is seen like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# lowest first: a module may import its own layer and those below it, never one above
LAYERS = {
    "core": ["studio", "studio.errors", "studio.registry", "studio.home", "studio.hashing", "studio.limits",
             "studio.outputs", "studio.faults", "studio.progress", "studio.folders", "studio.schedulers",
             "studio.tokenizer", "studio.tiny", "studio.recipe", "studio.backbones", "studio.embedded",
             "studio.concept_tokens", "studio.formats", "studio.deltas", "studio.blocks", "studio.images",
             "studio.world"],
    "adapters": ["studio.adapters", "studio.lora_formats"],
    "pipelines": ["studio.pipelines"],
    "training": ["studio.training", "studio.jobs", "studio.library", "studio.world.fidelity", "studio.world.train"],
    "merge": ["studio.merge"],
    "front": ["studio.cli", "studio.ui", "studio.demo", "studio.inspection", "app"],
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("adapters", "pipelines"):  # installed as studio.adapters, studio.pipelines
        parts.insert(0, "studio")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_files() -> dict[str, Path]:
    paths = [*ROOT.glob("studio/**/*.py"), *ROOT.glob("adapters/*.py"), *ROOT.glob("pipelines/*.py"), ROOT / "app.py"]
    return {module_name(p): p for p in paths}


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, name: str, modules: set[str]) -> set[tuple[str, int]]:
    """(imported module of the product, line) for every import in the file, lazy ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[tuple[str, int]] = set()
    stack: list[ast.AST] = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if _type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])])
            # `from package import module` imports the module; `from module import name`, the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {(t, node.lineno) for t in targets if t in modules and t != name}
    return found


def layer_of(module: str) -> int:
    best = max(((len(prefix), index) for index, prefixes in enumerate(LAYERS.values()) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to the README's architecture)"
    return best[1]


def graph() -> dict[str, set[tuple[str, int]]]:
    files = product_files()
    return {name: imports(path, name, set(files)) for name, path in files.items()}


def test_every_module_has_a_layer_and_imports_run_downward():
    names = list(LAYERS)
    upward = [f"{source}:{line} imports {target} ({names[layer_of(source)]} -> {names[layer_of(target)]})"
              for source, edges in graph().items() for target, line in sorted(edges)
              if layer_of(target) > layer_of(source)]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_module_imports_itself_back():
    edges = {source: {target for target, _ in targets} for source, targets in graph().items()}
    circles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not circles, "modules that import each other:\n" + "\n".join(circles)


def test_the_graph_reader_sees_lazy_imports(tmp_path):
    """The reader itself: an import inside a function counts, one under TYPE_CHECKING does not."""
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import studio.cli\n"
                      "def f():\n    from studio.training import trainer\n    import studio.merge.engine\n")
    modules = {"studio.cli", "studio.training", "studio.training.trainer", "studio.merge.engine", "studio.m"}
    assert imports(source, "studio.m", modules) == {("studio.training.trainer", 5), ("studio.merge.engine", 6)}
