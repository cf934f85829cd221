"""The package's import rules, read off the source with an AST walk (imports inside functions
count; imports only for type checkers do not):

* no import cycle anywhere in reluscope/;
* measure/ (format-neutral measuring) imports no backend, and none of onnx, onnxruntime, triton;
* api.py and run.py name no format: they reach backends only through `reluscope.backends`;
* a backend package does not import another backend package;
* data flows one way: load -> measure -> report -> present/gate, never back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "reluscope"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    if not name.startswith("reluscope."):
        return False
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or \
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _imports(path: Path) -> set[str]:
    """Every module `path` imports at run time (absolute names; `from . import x` resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names if _is_module(f"{target}.{alias.name}")}
            found.update(submodules)  # `from . import histogram` imports a module, not the package's names
            if len(submodules) < len(node.names):
                found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {target for target in _imports(path) if target in modules and target != name}
    return graph


GRAPH = _graph()


def _imports_of(prefix: str) -> dict[str, set[str]]:
    return {module: targets for module, targets in GRAPH.items()
            if module == prefix or module.startswith(prefix + ".")}


def _all_imports(prefix: str) -> set[tuple[str, str]]:
    """(module, imported) for every import, reluscope's own or third-party, of modules under `prefix`."""
    pairs = set()
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if module == prefix or module.startswith(prefix + "."):
            pairs.update((module, target) for target in _imports(path))
    return pairs


def test_the_walk_sees_the_package() -> None:
    assert "reluscope.measure.stats" in GRAPH and "reluscope.backends.torch.backend" in GRAPH
    assert "reluscope.measure.accumulators" in GRAPH["reluscope.measure.stats"]


def test_there_is_no_import_cycle() -> None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("forbidden", ["reluscope.backends", "onnx", "onnxruntime", "triton"])
def test_measure_imports_no_backend_or_runtime(forbidden: str) -> None:
    offenders = {(module, target) for module, target in _all_imports("reluscope.measure")
                 if target == forbidden or target.startswith(forbidden + ".")}
    assert not offenders


@pytest.mark.parametrize("module", ["reluscope.api", "reluscope.run"])
def test_the_wiring_names_no_format(module: str) -> None:
    backends = {target for target in GRAPH[module] if target.startswith("reluscope.backends")}
    assert backends <= {"reluscope.backends"}, backends
    tree = ast.parse((PACKAGE / (module.split(".", 1)[1] + ".py")).read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    code_words = [node.value.lower() for node in ast.walk(tree) if isinstance(node, ast.Constant)
                  and isinstance(node.value, str) and id(node) not in docstrings]
    code_words += [node.id.lower() for node in ast.walk(tree) if isinstance(node, ast.Name)]
    code_words += [node.attr.lower() for node in ast.walk(tree) if isinstance(node, ast.Attribute)]
    for word in ("onnx", "torchscript", "torch-export", "triton"):
        assert not [text for text in code_words if word in text], word


def test_backends_do_not_import_each_other() -> None:
    for one, other in (("torch", "onnx"), ("onnx", "torch")):
        reaching = {(module, target) for module, targets in _imports_of(f"reluscope.backends.{one}").items()
                    for target in targets if target.startswith(f"reluscope.backends.{other}")}
        assert not reaching, reaching


# Layers, lowest first: a module may import its own layer and those below it, never one above.
LAYERS = [
    {"reluscope._version", "reluscope.errors", "reluscope.files", "reluscope.distributed", "reluscope.options", "reluscope.config",
     "reluscope.settings", "reluscope.output"},
    {"reluscope.measure", "reluscope.data"},
    {"reluscope.run"},
    {"reluscope.backends"},
    {"reluscope.metrics", "reluscope.report", "reluscope.schema"},
    {"reluscope.api", "reluscope.gate", "reluscope.diff", "reluscope.pruning"},
    {"reluscope.present"},
    {"reluscope.cli", "reluscope.__main__"},
]


def _layer(module: str) -> int | None:
    for index, layer in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in layer):
            return index
    return None


def test_data_flows_one_way() -> None:
    upward = []
    for module, targets in GRAPH.items():
        low = _layer(module)
        for target in targets:
            high = _layer(target)
            if low is not None and high is not None and high > low:
                upward.append(f"{module} -> {target}")
    assert not upward


def test_every_module_has_a_layer() -> None:
    assert not [module for module in GRAPH if module != "reluscope" and _layer(module) is None]
