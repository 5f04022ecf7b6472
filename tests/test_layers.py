"""Import layers point one way: core <- torch <- schedulers <- drivers <- adapters <- recipes and CLI.

Every ``import`` and ``from ... import`` in ``zoblackbox/`` and ``adapters/`` (installed as
``zoblackbox.adapters``) is read from the source with ``ast`` -- module level, inside functions and
under ``if TYPE_CHECKING`` alike, since a lazy import is still a dependency -- and must point to the
same layer or one below. The layers:

1. core -- flat-vector math: oracles, query plans, estimators, update rules, L-BFGS, checkpoints;
2. torch -- torch modules as oracles (``ModuleOracle``), staged models, model zoo, data;
3. schedulers -- ``zoblackbox.schedule.*``, faster evaluators of query plans;
4. drivers -- ``minimize``, the ``Trainer``, callbacks;
5. adapters -- ``zoblackbox.adapters.*``, concrete targets (PDE solvers, gym, processes, the
   certified-defense pipeline); they build on 1-4 and the library never imports them;
6. recipes and CLI -- the command line, recipes, test helpers; may import anything.

Every ``zoblackbox.*`` module must be in :data:`LAYERS` (or under a package of
:data:`PACKAGE_LAYERS`): a new module fails the test until it is given a layer deliberately.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: source directory of each package (setuptools package-dir: ``adapters/`` is ``zoblackbox.adapters``)
SOURCES = {"zoblackbox": ROOT / "zoblackbox", "zoblackbox.adapters": ROOT / "adapters"}

CORE, TORCH, SCHEDULERS, DRIVERS, ADAPTERS, RECIPES = 1, 2, 3, 4, 5, 6
LAYER_NAMES = {CORE: "core", TORCH: "torch", SCHEDULERS: "schedulers", DRIVERS: "drivers", ADAPTERS: "adapters",
               RECIPES: "recipes/CLI"}

#: the facade: re-exports public names, so it is not checked as an importer; importing it runs its
#: eager imports (up to the drivers), so it counts as a driver when imported
FACADE = "zoblackbox"

#: every module of the package, by layer. Names that do not exist (yet) are harmless; a module
#: missing here fails ``test_every_module_has_a_layer``.
LAYERS = {
    # 1. core: no torch.nn models, no schedulers, no drivers
    "zoblackbox.errors": CORE,
    "zoblackbox._types": CORE,  # type aliases and protocols of the public signatures (annotations only)
    "zoblackbox.oracle": CORE,
    "zoblackbox.plan": CORE,
    "zoblackbox.params": CORE,
    "zoblackbox.estimators": CORE,
    "zoblackbox.directions": CORE,
    "zoblackbox.seed_replay": CORE,  # memory-free RGE: seeded plans, estimates and their SGD rule
    "zoblackbox.parts": CORE,
    "zoblackbox.shaping": CORE,
    "zoblackbox.sparsity": CORE,
    "zoblackbox.checkpoint": CORE,
    "zoblackbox.result": CORE,
    "zoblackbox.engine": CORE,
    "zoblackbox.lbfgs": CORE,
    "zoblackbox.rules": CORE,
    "zoblackbox.schedules": CORE,  # learning-rate schedules (not the query schedulers of zoblackbox.schedule)
    "zoblackbox.presets": CORE,
    "zoblackbox.smoothing": CORE,
    "zoblackbox.noise": CORE,
    "zoblackbox.strategy": CORE,  # the zero-configuration default rule (uses pycma, a dependency)
    # 2. torch layer
    "zoblackbox.torch_module": TORCH,
    "zoblackbox.staged": TORCH,
    "zoblackbox.staged_fx": TORCH,
    "zoblackbox.resnet": TORCH,
    "zoblackbox.models": TORCH,
    "zoblackbox.data": TORCH,
    "zoblackbox.nn": TORCH,
    # 3. schedulers: zoblackbox.schedule and its submodules (PACKAGE_LAYERS)
    # 4. drivers
    "zoblackbox.optim": DRIVERS,
    "zoblackbox.train": DRIVERS,
    "zoblackbox.trainer_parts": DRIVERS,
    "zoblackbox.callbacks": DRIVERS,
    # 6. recipes, CLI and test helpers
    "zoblackbox.recipes": RECIPES,
    "zoblackbox.cli": RECIPES,
    "zoblackbox.cli_pde": RECIPES,
    "zoblackbox.cli_minimize": RECIPES,
    "zoblackbox.cli_args": RECIPES,
    "zoblackbox.testing": RECIPES,
    "zoblackbox.faults": RECIPES,
    "zoblackbox.__main__": RECIPES,
}
#: packages whose every submodule shares the package's layer
PACKAGE_LAYERS = {
    "zoblackbox.schedule": SCHEDULERS,
    "zoblackbox.adapters": ADAPTERS,
}

#: (importer, imported) pairs tolerated for now, each with the reason; the lead empties this set.
#: An entry that no longer occurs fails ``test_known_violations_still_occur`` (delete it then).
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}

#: modules that ``import zoblackbox.schedule`` must not load (heavy, optional or unrelated targets)
HEAVY = ("zoblackbox.adapters.blackbox", "zoblackbox.adapters.phiflow", "zoblackbox.adapters.gym",
         "zoblackbox.adapters.burgers", "zoblackbox.adapters.wake", "zoblackbox.adapters.process")


def layer_of(module: str) -> int | None:
    """The layer of a ``zoblackbox`` module, or ``None`` when the tables do not name it."""
    if module == FACADE:
        return DRIVERS
    if module in LAYERS:
        return LAYERS[module]
    for package, layer in PACKAGE_LAYERS.items():
        if module == package or module.startswith(package + "."):
            return layer
    return None


def discover() -> dict[str, Path]:
    """``{module name: source file}`` for every module of ``zoblackbox`` and ``zoblackbox.adapters``."""
    modules = {}
    for package, directory in SOURCES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _resolve_from(importer: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module named by a ``from ... import`` (relative ones resolved from ``importer``)."""
    if node.level == 0:
        return node.module or ""
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(importer: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every ``zoblackbox`` import anywhere in the file.

    ``from package import name`` counts as importing ``package.name`` when that is a module
    (``known``, or a name of the layer tables), else as importing ``package``. Literal
    ``importlib.import_module("zoblackbox...")`` calls count too.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(importer, path, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = sub in known or sub in LAYERS or sub in PACKAGE_LAYERS
                found.append((sub if is_module else base, node.lineno))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module"
                   or getattr(node.func, "id", None) in ("import_module", "__import__"))):
            found.append((node.args[0].value, node.lineno))
    return [(name, line) for name, line in found if name == FACADE or name.startswith(FACADE + ".")]


def import_graph() -> list[tuple[str, str, Path, int]]:
    """Every ``(importer, imported, file, line)`` edge between ``zoblackbox`` modules."""
    modules = discover()
    known = set(modules)
    return [(importer, imported, path, line)
            for importer, path in modules.items()
            for imported, line in imports_of(importer, path, known)]


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


# ---------------------------------------------------------------------------------------------- tests
def test_every_module_has_a_layer():
    """A new module must be placed in a layer on purpose (LAYERS or PACKAGE_LAYERS above)."""
    unknown = [f"{name} ({path.relative_to(ROOT)})" for name, path in discover().items()
               if name != FACADE and layer_of(name) is None]
    assert not unknown, (f"modules with no layer in tests/test_layers.py: {unknown}; add each to LAYERS "
                         f"(core, torch, schedulers, drivers, recipes/CLI) deliberately")


def test_imports_point_down():
    """No module imports from a higher layer; the library (layers 1-4) never imports the adapters."""
    unknown, violations, tolerated = [], [], set()
    for importer, imported, path, line in import_graph():
        if importer == FACADE:
            continue
        src, dst = layer_of(importer), layer_of(imported)
        if src is None:
            continue  # reported by test_every_module_has_a_layer
        if dst is None:
            unknown.append(f"{importer} -> {imported} (not in the layer tables), {_where(path, line)}")
            continue
        if dst <= src:
            continue
        if (importer, imported) in KNOWN_VIOLATIONS:
            tolerated.add((importer, imported))
            continue
        violations.append(f"{importer} -> {imported} ({LAYER_NAMES[src]} -> {LAYER_NAMES[dst]}), "
                          f"{_where(path, line)}")
    assert not unknown, "imports of modules with no layer:\n  " + "\n  ".join(unknown)
    assert not violations, ("imports that point up a layer (core < torch < schedulers < drivers < adapters < "
                            "recipes/CLI):\n  " + "\n  ".join(violations))


def test_known_violations_still_occur():
    """An entry of KNOWN_VIOLATIONS whose import is gone must be deleted (the set only shrinks)."""
    edges = {(importer, imported) for importer, imported, _, _ in import_graph()}
    stale = sorted(pair for pair in KNOWN_VIOLATIONS if pair not in edges)
    assert not stale, f"KNOWN_VIOLATIONS entries that no longer occur; delete them: {stale}"


def test_cli_and_cli_pde_do_not_import_each_other_both_ways():
    """``cli`` registers the ``pde`` sub-command, so ``cli_pde`` must not import ``cli`` (a cycle);
    shared argument types live in ``cli_args``. Checked on the source graph, transitively."""
    graph: dict[str, set[str]] = {}
    for importer, imported, _, _ in import_graph():
        graph.setdefault(importer, set()).add(imported)
    seen, todo = set(), ["zoblackbox.cli_pde"]
    while todo:
        module = todo.pop()
        for nxt in graph.get(module, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert "zoblackbox.cli" not in seen, "zoblackbox.cli_pde imports zoblackbox.cli (directly or through others)"
    assert "zoblackbox.cli_pde" in graph.get("zoblackbox.cli", set())  # the sub-command is still registered


def test_cli_pde_imports_without_cli():
    out = _run_python("import sys, zoblackbox.cli_pde; print('zoblackbox.cli' in sys.modules)")
    assert out.strip() == "False", f"importing zoblackbox.cli_pde loaded zoblackbox.cli: {out}"


# Imports zoblackbox.schedule and prints, one per line, "name<TAB>importer" for the watched modules
# it loaded: the importer is the innermost zoblackbox source line on the stack at their first import.
_PROBE = textwrap.dedent("""
    import sys, traceback
    WATCH = {watch!r}
    first = {{}}

    class Spy:
        def find_spec(self, name, path=None, target=None):
            if name in WATCH and name not in first:
                frames = [f for f in traceback.extract_stack()[:-1]
                          if ("zoblackbox" in f.filename or "/adapters/" in f.filename)
                          and "__editable__" not in f.filename]
                first[name] = f"{{frames[-1].filename}}:{{frames[-1].lineno}}" if frames else "?"
            return None

    sys.meta_path.insert(0, Spy())
    import zoblackbox.schedule
    for name in WATCH:
        if name in sys.modules:
            print(f"{{name}}\\t{{first.get(name, '?')}}")
""")


def _run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, f"python -c failed:\n{proc.stderr}"
    return proc.stdout


def _loaded_by_schedule(watch) -> dict[str, str]:
    lines = _run_python(_PROBE.format(watch=tuple(watch))).splitlines()
    return dict(line.split("\t", 1) for line in lines if line)


def test_import_schedule_loads_no_adapter_target():
    """``import zoblackbox.schedule`` (with the facade's eager imports) loads no concrete target."""
    loaded = _loaded_by_schedule(HEAVY)
    assert not loaded, "import zoblackbox.schedule loaded: " + ", ".join(
        f"{name} (first imported at {where})" for name, where in loaded.items())


def test_import_schedule_loads_no_scipy_stats():
    """``scipy.stats`` (about 0.3 s to import) belongs to the certification code, not the schedulers."""
    loaded = _loaded_by_schedule(["scipy.stats"])
    assert not loaded, "import zoblackbox.schedule loaded: " + ", ".join(
        f"{name} (first imported at {where})" for name, where in loaded.items())
