"""The layer rules of docs/design.md, checked against the code's imports, so they stay true.

wire < fl < protocol < ml < runtime < tools < agents: a module imports only from its own layer or those
below it; the protocol machines import neither torch nor the transport; nothing imports in a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["mqttfl.wire", "mqttfl.fl", "mqttfl.protocol", "mqttfl.ml", "mqttfl.runtime", "mqttfl.tools", "agents"]
AGENTS = ("device_agent", "edge_agent", "cloud_agent")
# Third-party modules that only some layers may use: torch lives behind the stage interface (ml), paho in the
# transport (runtime), scikit-learn only where a bundled data set is loaded on demand.
RESTRICTED = {"torch": {"mqttfl.ml", "mqttfl.runtime", "mqttfl.tools", "agents"},
              "paho": {"mqttfl.runtime", "mqttfl.tools"}}


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("mqttfl", *AGENTS):
        for p in (ROOT / top).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = p
    return out


def _layer(module: str) -> str:
    if module.split(".")[0] in AGENTS:
        return "agents"
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            return layer
    return "mqttfl"  # the package root


def _imports(path: Path, module: str) -> set[str]:
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def test_every_module_imports_only_its_own_layer_or_those_below() -> None:
    modules = _modules()
    problems = []
    for name, path in modules.items():
        mine = _layer(name)
        rank = LAYERS.index(mine) if mine in LAYERS else -1
        for imported in _imports(path, name):
            top = imported.split(".")[0]
            if top in RESTRICTED and mine not in RESTRICTED[top]:
                problems.append(f"{name} ({mine}) imports {imported}")
            if top not in ("mqttfl", *AGENTS) or imported not in modules and imported.rpartition(".")[0] not in modules:
                continue
            target = imported if imported in modules else imported.rpartition(".")[0]
            theirs = _layer(target)
            if theirs in LAYERS and LAYERS.index(theirs) > rank:
                problems.append(f"{name} ({mine}) imports {target} ({theirs})")
    assert not problems, "layer rule broken:\n" + "\n".join(sorted(problems))


def test_the_protocol_machines_import_neither_torch_nor_the_transport() -> None:
    for name, path in _modules().items():
        if _layer(name) in ("mqttfl.wire", "mqttfl.fl", "mqttfl.protocol"):
            imports = _imports(path, name)
            assert not any(i.split(".")[0] in ("torch", "paho") for i in imports), name
            assert not any(i.startswith("mqttfl.runtime") for i in imports), name


def test_the_import_graph_has_no_cycles() -> None:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imported in _imports(path, name):
            if imported in modules:
                deps.add(imported)
            elif imported.rpartition(".")[0] in modules:
                deps.add(imported.rpartition(".")[0])
        graph[name] = deps - {name}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in graph[n]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)
