"""The package's structure as docs/DESIGN.md draws it: imports point down its layers, never up,
and no modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import cfgdiff

ROOT = Path(cfgdiff.__file__).parent

# docs/DESIGN.md, "Dependency direction": bottom first; a part may import its own layer's parts
# and any below it.
# A part is a top-level module or package, or a module of a package named on its own (the
# sampler table and the text encoder sit below the rest of their packages).
LAYERS = [
    {"errors", "files", "layers", "ema", "dist", "text.encoder", "run_layout"},
    {"schedule", "data"},
    {"sampling.samplers", "pictures"},
    {"config"},
    {"diffusion", "presets", "runtime", "unet", "text", "records"},
    {"sampling.guidance", "checkpoint", "compiled", "oracles", "onnx_net"},
    {"sampling"},
    {"metrics", "export"},
    {"train", "serve"},
    {"cli", "__init__", "__main__"},
]
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """cfgdiff module -> the cfgdiff modules it imports (anywhere in it, functions included)."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("cfgdiff")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cfgdiff"):
                for a in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if sub in modules else node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _part(module: str) -> str:
    parts = module.split(".")[1:]
    for k in range(len(parts), 0, -1):  # the longest name the layers list
        if ".".join(parts[:k]) in LAYER:
            return ".".join(parts[:k])
    return "__init__"


def test_every_part_has_a_layer():
    parts = {_part(m) for m in _imports()}
    assert parts == set(LAYER), parts ^ set(LAYER)


def test_imports_point_down_the_layers():
    up = [
        f"{a} -> {b}"
        for a, targets in _imports().items()
        for b in targets
        if LAYER[_part(b)] > LAYER[_part(a)]
    ]
    assert up == []


def test_no_import_cycles():
    graph = _imports()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError(" -> ".join(path[path.index(node) :] + [node]))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_nothing_imports_the_cli():
    assert [a for a, bs in _imports().items() for b in bs if _part(b) == "cli"
            and _part(a) not in ("cli", "__main__")] == []  # fmt: skip
