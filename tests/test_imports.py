"""normlab's imports run one way, read from the source with `ast`:

    lab -> registry, fold, freeze -> layers, optim, rebalancers -> functional
        -> collectives (distributed), module_kinds and the kernel loader (_ext)

(checks, the argument checks every floor shares, sits at the bottom). No module
imports one on a higher floor, the graph has no cycle, and no private name (``_x``)
crosses from one module into another.
"""

import ast
from pathlib import Path

import normlab

SRC = Path(normlab.__file__).parent

# module-name prefix -> floor; the longest matching prefix decides; higher imports lower
FLOORS = {
    "normlab._ext": 0, "normlab._moved": 0, "normlab.checks": 0,
    "normlab.distributed": 0, "normlab.module_kinds": 0,
    "normlab.functional": 1,
    "normlab.layers": 2, "normlab.optim": 2, "normlab.rebalancers": 2,
    "normlab.registry": 3, "normlab.fold": 3, "normlab.freeze": 3,
    "normlab": 4, "normlab.__main__": 4, "normlab.lab": 4,
}


def floor(module: str) -> int:
    prefix = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[prefix]


def module_name(path: Path) -> str:
    parts = ("normlab", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def imports(name: str) -> list[tuple[str, str | None]]:
    """(imported normlab module, name taken from it or None) for every import statement in
    module `name`, at any depth (a function-level import is an import too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, None) if submodule in MODULES else (base, alias.name))
    return [(target, taken) for target, taken in found
            if target == "normlab" or target.startswith("normlab.")]


def edges() -> dict[str, set[str]]:
    """module -> the normlab modules importing it runs: the module imported and the
    packages above it, up to (not including) normlab itself, whose __init__ runs first."""
    graph = {name: set() for name in MODULES}
    for name in MODULES:
        for target, _ in imports(name):
            parts = target.split(".")
            for depth in range(2, len(parts) + 1):
                above = ".".join(parts[:depth])
                if above in MODULES and above != name and not name.startswith(above + "."):
                    graph[name].add(above)
    return graph


def test_the_walk_sees_the_layout():
    assert {"normlab.functional", "normlab.registry", "normlab.lab.cli",
            "normlab.distributed.convert"} <= set(MODULES)
    assert ("normlab.registry", None) in imports("normlab.lab.models")


def test_no_import_against_the_direction():
    upward = sorted(f"{name} (floor {floor(name)}) imports {target} (floor {floor(target)})"
                    for name, targets in edges().items() for target in targets
                    if floor(target) > floor(name))
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = edges()
    state, stack, cycles = {}, [], []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "\n".join(cycles)


def test_no_private_name_crosses_modules():
    crossing = sorted(f"{name} imports {taken} from {target}"
                      for name in MODULES for target, taken in imports(name)
                      if taken and taken.startswith("_") and not taken.startswith("__")
                      and target != name)
    assert not crossing, "\n".join(crossing)


def test_the_optimizers_use_the_layers_public_interface():
    # FastNormSGD finds its layers with layers.fastnorm.layer_of and steps them with their
    # public methods: no attribute access `obj._x` on anything but itself
    private = []
    for name, path in MODULES.items():
        if not name.startswith("normlab.optim"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self")
                    and not (isinstance(node.value, ast.Call)
                             and getattr(node.value.func, "id", "") == "super")):
                private.append(f"{name}:{node.lineno} .{node.attr}")
    assert not private, "\n".join(private)
