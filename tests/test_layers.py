"""The house in layers: a package per layer along the data flow, imports only downward, no import
cycles, every third-party import declared in pyproject.toml. Read from the source (ast), so a
function-level import counts as much as a top-level one."""

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import its own layer and the layers before it, never one after it
LAYERS = [
    ("base", ["vae_lab", "vae_lab.config", "vae_lab.components", "vae_lab.names", "vae_lab.cli", "vae_lab.interrupts",
              "vae_lab.files"]),
    ("data", ["vae_lab.data"]),
    ("models", ["vae_lab.models"]),
    ("evaluation", ["vae_lab.evaluation"]),
    ("tracking", ["vae_lab.tracking"]),
    ("training", ["vae_lab.training"]),
    ("study", ["vae_lab.study"]),
    ("serve", ["vae_lab.serve"]),
    ("commands", ["vae_lab.train", "vae_lab.sweep", "vae_lab.evaluate", "vae_lab.serve.__main__",
                  "vae_lab.storage_proxy"]),
    ("analysis", ["analysis"]),
]


def module_files() -> dict[str, Path]:
    modules = {}
    for package in ("vae_lab", "analysis"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = module_files()


def layer_of(module: str) -> int:
    """The layer of the longest prefix that names `module` (vae_lab.serve.__main__ is a command)."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact_only = prefix == "vae_lab"
            matches = module == prefix or (not exact_only and module.startswith(prefix + "."))
            if matches and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}"
    return best


def imports_of(module: str) -> list[tuple[str, int]]:
    """(imported name, line) for every import in the module, relative ones resolved."""
    path = MODULES[module]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names
                      if f"{base}.{alias.name}" in MODULES]
    return found


def internal_imports(module: str) -> set[str]:
    targets = set()
    for name, _ in imports_of(module):
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module and not module.startswith(name + "."):
            targets.add(name)
    return targets


def test_every_module_imports_only_its_own_layer_and_those_below():
    upward = []
    for module in sorted(MODULES):
        for target in internal_imports(module):
            if target in ("vae_lab", "analysis"):
                continue  # the package roots hold nothing but their doc
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {module: internal_imports(module) for module in MODULES}
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0]
            .strip().lower().replace("_", "-") for requirement in requirements}


def test_every_third_party_import_of_the_packages_is_declared():
    """What vae_lab and analysis import directly must be in pyproject.toml (dependencies or an
    extra), not arrive by luck as some other package's dependency."""
    providers = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    missing = {}
    for module in MODULES:
        for name, line in imports_of(module):
            top = name.split(".")[0]
            if not top or top in ("vae_lab", "analysis") or top in sys.stdlib_module_names:
                continue
            distributions = {dist.lower().replace("_", "-") for dist in providers.get(top, [])}
            assert distributions, f"{module}:{line} imports {top}, which no installed distribution provides"
            if not distributions & declared:
                missing.setdefault(", ".join(sorted(distributions)), f"{module}:{line}")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(
        f"{dist} (first at {where})" for dist, where in sorted(missing.items()))


def test_every_name_the_benchmark_scripts_import_from_the_packages_exists():
    """A benchmark imports by name from vae_lab and analysis; a name that moved breaks it silently
    until someone runs it (single_run.py and two others once imported a constant that had moved)."""
    import importlib

    missing = []
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("vae_lab", "analysis"):
                module = importlib.import_module(node.module)
                missing += [f"{script.name}:{node.lineno} {node.module}.{alias.name}" for alias in node.names
                            if not hasattr(module, alias.name) and not (
                                hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}"))]
    assert not missing, "benchmark scripts import names that do not exist: " + ", ".join(missing)
