"""The package's modules import only downward, and no two modules import each other, even indirectly.

The graph is read from the source (every ``import`` statement, inside functions and
``TYPE_CHECKING`` blocks included, and ``importlib.import_module`` of a constant name),
so an import that only runs later still counts.
The layers, lowest first, are those of the code map in docs/design.md; a module may
import its own layer and the ones below, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bmojo_neuron", "nki_kernels")

# lowest first; a name covers the module and everything under it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("nki_kernels",)),
    ("base", ("bmojo_neuron._version", "bmojo_neuron.fsutil", "bmojo_neuron.locking", "bmojo_neuron.neuron",
              "bmojo_neuron.nxd_compat", "bmojo_neuron.device", "bmojo_neuron.compiler_rules")),
    ("model", ("bmojo_neuron.config_fields", "bmojo_neuron.configuration_bmojo", "bmojo_neuron.ops",
               "bmojo_neuron.layers", "bmojo_neuron.cache_bmojo", "bmojo_neuron.modeling_bmojo", "bmojo_neuron")),
    ("parallel", ("bmojo_neuron.parallel",)),
    ("data", ("bmojo_neuron.data", "bmojo_neuron.recipes", "bmojo_neuron.recipe_runs", "bmojo_neuron.compile_cache")),
    ("checkpoints", ("bmojo_neuron.checkpoints", "bmojo_neuron.evaluation", "bmojo_neuron.memory_inspection",
                     "bmojo_neuron.generation")),
    ("priming", ("bmojo_neuron.priming",)),
    ("launch", ("bmojo_neuron.launch",)),
    ("training", ("bmojo_neuron.training", "bmojo_neuron.preflight")),
    ("bench", ("bmojo_neuron.bench",)),
    ("commands", ("bmojo_neuron.commands", "bmojo_neuron.cli")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """``module -> the package modules it imports`` (``from package import name`` counts as the submodule
    `name` when there is one, else as the package)."""
    known = modules()

    def existing(name: str) -> str | None:
        parts = name.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        return ".".join(parts) or None

    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        tree = ast.parse(path.read_text(), str(path))
        constants = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                     and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                     for t in node.targets if isinstance(t, ast.Name)}
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args and _called(node) == "import_module":
                arg = node.args[0]
                text = arg.value if isinstance(arg, ast.Constant) else constants.get(getattr(arg, "id", ""))
                if isinstance(text, str):
                    dots = len(text) - len(text.lstrip("."))
                    absolute = ".".join(here[:len(here) - dots + 1] + [text[dots:]]) if dots else text
                    target = existing(absolute)
                    if target and target != name:
                        targets.add(target)
            elif isinstance(node, ast.Import):
                targets.update(t for t in (existing(a.name) for a in node.names) if t)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    target = submodule if submodule in known else existing(base)
                    if target and target != name:
                        targets.add(target)
        graph[name] = targets - {name}
    return graph


def _called(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def layer_of(module: str) -> int:
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{module} is in no layer of tests/test_import_graph.py (and docs/design.md)"
    return rank


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_scanner_sees_imports_inside_functions(graph):
    # `ops` loads its NKI backend only when that backend is first used: an import inside a function
    assert "bmojo_neuron.ops.nki_backend" in graph["bmojo_neuron.ops"]
    # the `kernels` bench suite imports the profiler by name, so that a checkout without the emulator skips it
    assert "bmojo_neuron.bench.kernel_profile" in graph["bmojo_neuron.bench.suites"]
    # the package loads the model classes on first use (`importlib.import_module(".modeling_bmojo", __name__)`)
    assert "bmojo_neuron.modeling_bmojo" in graph["bmojo_neuron"]


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_every_import_goes_down_the_layers(graph):
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m in sorted(graph) for t in sorted(graph[m]) if layer_of(t) > layer_of(m)]
    assert upward == []


def test_the_kernels_stand_alone(graph):
    assert not {m for m in graph if m.startswith("nki_kernels")
                for t in reachable(graph, m) if t.startswith("bmojo_neuron")}


@pytest.mark.parametrize("command", ["bmojo_neuron.commands.generate", "bmojo_neuron.commands.evaluate"])
def test_inference_commands_never_reach_the_trainer(graph, command):
    assert not {t for t in reachable(graph, command) if t.startswith("bmojo_neuron.training")}


# Imports inside functions, outside the command modules (which import their library lazily so that
# `bmojo-neuron --help` is instant), and why each must wait. Anything else belongs at the top of its module.
LAZY_IMPORTS: dict[str, tuple[set[str], str]] = {
    "bmojo_neuron.auto_registration": ({"bmojo_neuron.configuration_bmojo", "bmojo_neuron.modeling_bmojo"},
                                       "runs at `import bmojo_neuron`, which must not import torch"),
    "bmojo_neuron.configuration_bmojo": ({"bmojo_neuron.auto_map"}, "auto_map imports the configuration"),
    "bmojo_neuron.launch.memory": ({"bmojo_neuron.parallel.pipeline", "bmojo_neuron.parallel.sharding",
                                    "bmojo_neuron.priming.distill"},
                                   "launch is torch-free: `plan` starts without torch"),
    "bmojo_neuron.launch.plan": ({"bmojo_neuron.launch.host_memory", "bmojo_neuron.parallel.layout",
                                  "bmojo_neuron.parallel.pipeline"},
                                 "launch is torch-free: `plan` starts without torch"),
    "bmojo_neuron.launch.precompile": ({"bmojo_neuron.compile_cache.s3", "bmojo_neuron.data.text"},
                                       "boto3 only for an S3 cache; tokenizers only for text recipes"),
    "bmojo_neuron.ops": ({"bmojo_neuron.ops.nki_backend", "nki_kernels", "nki_kernels.emulator"},
                         "the NKI backends load when first chosen"),
    "bmojo_neuron.recipes": ({"bmojo_neuron", "bmojo_neuron.data.mqar"},
                             "recipes are read by `plan` and the launchers, without torch or numpy"),
    "nki_kernels.compat": ({"nki_kernels.emulator"}, "the emulator stands in only where NKI is not installed"),
    "nki_kernels.emulator.frontend": ({"nki_kernels.emulator"}, "the language module imports the front end"),
}


def function_level_imports() -> dict[str, set[str]]:
    """``module -> package modules imported inside its functions``, command modules left out."""
    found: dict[str, set[str]] = {}
    for name, path in modules().items():
        if name.startswith("bmojo_neuron.commands") or name == "bmojo_neuron.cli":
            continue
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for function in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom):
                    target = (".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                              if node.level else node.module)
                elif isinstance(node, ast.Import):
                    target = node.names[0].name
                else:
                    continue
                if target and target.split(".")[0] in PACKAGES:
                    found.setdefault(name, set()).add(target)
    return found


def test_imports_wait_inside_functions_only_for_a_reason():
    found = function_level_imports()
    unexplained = {m: sorted(t - LAZY_IMPORTS.get(m, (set(), ""))[0]) for m, t in found.items()}
    assert {m: t for m, t in unexplained.items() if t} == {}
    stale = {m: sorted(t - found.get(m, set())) for m, (t, _) in LAZY_IMPORTS.items()}
    assert {m: t for m, t in stale.items() if t} == {}, "LAZY_IMPORTS lists imports that are gone"
