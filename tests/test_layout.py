"""The package's layers, read from its source (no database): the pooling core below, the fleet
telemetry above it, the public face (ENGINE, middleware, API, admin, commands) on top, and no
import cycle anywhere. Every import counts, those inside functions too; only ``if
TYPE_CHECKING:`` blocks, which never run, are left out."""

from __future__ import annotations

import ast
from pathlib import Path

import django_pooled_pg

# The package under test: the checkout's, or the installed wheel's (scripts/test-wheel).
PACKAGE = Path(django_pooled_pg.__file__).resolve().parent
#: Modules every layer may use: they import nothing of the package.
SHARED = {"errors", "signals", "settings", "eventlog"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    skipped: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            skipped.update(ast.walk(node))
    return skipped


def imports_of(name: str, source: str, package: str, known: set[str], type_only: bool = False) -> set[str]:
    """The package's modules that module ``name`` (of ``package``) imports, anywhere in its code
    (with ``type_only``, in its ``if TYPE_CHECKING:`` blocks too)."""
    tree = ast.parse(source)
    skipped = set() if type_only else _type_checking_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{alias.name}" for alias in node.names] + [target]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name and candidate != "django_pooled_pg":
                found.add(candidate)
                break
    return found


def graph(type_only: bool = False) -> dict[str, set[str]]:
    mods = modules()
    return {
        name: imports_of(
            name,
            path.read_text(),
            name if path.name == "__init__.py" else name.rpartition(".")[0],
            set(mods),
            type_only,
        )
        for name, path in mods.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def layer(name: str) -> str:
    short = name.removeprefix("django_pooled_pg.")
    if short.startswith("pooling"):
        return "pooling"
    if short.startswith("telemetry"):
        return "telemetry"
    return "shared" if short in SHARED else "face"


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_no_import_cycle_type_only_imports_included():
    """Not even the type checker goes round in a circle (in pooling/ the pool's connection class
    once imported the pool for a type, and the ledger the pool and, inside a function, the
    release module)."""
    assert cycles(graph(type_only=True)) == []


#: base.py is the ENGINE's diff against Django's postgresql/base.py: what a borrow is lives in
#: pooling/borrow.py, the per-statement release, the cursors, the session set-up and the pool's
#: making in modules of their own.
BASE_MAX_LINES = 420


def test_base_stays_a_small_diff_against_djangos_backend():
    lines = len((PACKAGE / "base.py").read_text().splitlines())
    assert lines <= BASE_MAX_LINES, f"base.py has {lines} lines: move what is not the ENGINE's own out"


def fork_handlers() -> dict[str, int]:
    """For each module, how many ``os.register_at_fork`` calls it makes."""
    found = {}
    for name, path in modules().items():
        calls = [
            node
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "register_at_fork"
        ]
        if calls:
            found[name] = len(calls)
    return found


def test_one_fork_handler_per_module_and_none_that_needs_another_first():
    """Each module that keeps per-process state forgets it in one fork handler of its own. What
    needs the registry's new generation (the ENGINE's connection objects) hooks into the
    registry's handler (``registry.forked``) instead of registering one whose turn would depend
    on the order of the imports."""
    handlers = fork_handlers()
    assert all(count == 1 for count in handlers.values()), handlers
    assert "django_pooled_pg.pooling.registry" in handlers
    assert "django_pooled_pg.base" not in handlers and "django_pooled_pg.pooling.borrow" not in handlers


def test_the_layers_import_only_downwards():
    allowed = {
        "shared": {"shared"},
        "pooling": {"shared", "pooling"},
        "telemetry": {"shared", "pooling", "telemetry"},
        "face": {"shared", "pooling", "telemetry", "face"},
    }
    wrong = [
        f"{name} ({layer(name)}) imports {target} ({layer(target)})"
        for name, targets in graph().items()
        for target in sorted(targets)
        if layer(target) not in allowed[layer(name)]
    ]
    assert wrong == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    """The checks can fail: an import inside a function of the core that reaches telemetry is
    found, is upward, and closes a cycle (what registry.py had before the pool_created hook)."""
    known = set(modules())
    source = "def start():\n    from ..telemetry.publisher import publisher\n"
    found = imports_of("django_pooled_pg.pooling.registry", source, "django_pooled_pg.pooling", known)
    assert found == {"django_pooled_pg.telemetry.publisher"}
    assert layer("django_pooled_pg.pooling.registry") == "pooling"
    assert layer("django_pooled_pg.telemetry.publisher") == "telemetry"
    edges = graph()
    edges["django_pooled_pg.pooling.registry"] |= found
    assert any("django_pooled_pg.pooling.registry" in cycle for cycle in cycles(edges))


# ----- Each counter counted in one place ---------------------------------------------------------

#: Counters with more than one place, and why. ``rollbacks`` (per view): the return path (base.py's _close)
#: and the reclaim of a thread that ended holding its connection (ledger.py); one helper for both
#: would add a function call to every return.
COUNTED_TWICE = {"rollbacks"}


def counted_in(source: str, where: str) -> dict[str, set[str]]:
    """For each counter of COUNTERS, the functions of ``source`` that add to it (``x.name += ...``)."""
    from django_pooled_pg.pooling.stats import COUNTER_NAMES

    found: dict[str, set[str]] = {}

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{function}.{child.name}")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{function}.{child.name}")
            else:
                target = getattr(child, "target", None)
                if (
                    isinstance(child, ast.AugAssign)
                    and isinstance(target, ast.Attribute)
                    and target.attr in COUNTER_NAMES
                ):
                    found.setdefault(target.attr, set()).add(f"{function}:{child.lineno}")
                visit(child, function)

    visit(ast.parse(source), where)
    return found


def places_of_counters() -> dict[str, set[str]]:
    """Where events are counted: the telemetry layer only adds up counts of processes and views."""
    places: dict[str, set[str]] = {}
    for name, path in modules().items():
        if layer(name) == "telemetry":
            continue
        for counter, where in counted_in(path.read_text(), name).items():
            places.setdefault(counter, set()).update(where)
    return places


def test_each_counter_is_counted_in_one_place():
    """Every counter of COUNTERS has one statement that adds to it (a stats method, or the one
    spot of its event), so that what it counts is decided once."""
    places = places_of_counters()
    twice = {counter: sorted(where) for counter, where in places.items() if len(where) > 1}
    assert set(twice) == COUNTED_TWICE, twice


def test_the_counter_check_finds_a_second_place():
    source = "class A:\n    def f(self, s):\n        s.borrows += 1\n\ndef g(stats):\n    stats.borrows += 1\n"
    assert counted_in(source, "m") == {"borrows": {"m.A.f:3", "m.g:6"}}


def test_every_error_is_importable_from_the_package():
    """Each exception the package raises (every PoolError of errors.py) is a public name: a
    user catches ``django_pooled_pg.BudgetExhausted`` as they catch ``PoolExhausted``."""
    import django_pooled_pg
    from django_pooled_pg import errors

    raised = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.PoolError) and not name.startswith("_")
    }
    assert raised <= set(django_pooled_pg.__all__), sorted(raised - set(django_pooled_pg.__all__))
    assert all(getattr(django_pooled_pg, name) is getattr(errors, name) for name in raised)


#: Attributes read or written on every statement's park and take-back.
HOT_WRAPPER_ATTRIBUTES = ("_borrow", "_per_statement", "_open_cursors", "_pins")


def test_the_attributes_of_the_borrow_path_have_no_default_on_the_class():
    """CPython 3.12 does not specialize reading or writing an instance attribute whose name the
    class also holds: each access then takes the generic lookup. Defaults on the class for the
    connection's pool state and the wrapper's borrow cost 2.7k instructions of a park and
    take-back's 18k (``bench/results/instructions/``). They are set in ``__init__`` instead."""
    from psycopg import Connection

    from django_pooled_pg.base import DatabaseWrapper
    from django_pooled_pg.pooling.connection import health_tracking

    connection_class = health_tracking(Connection, health=None)  # type: ignore[arg-type]  # (not called)
    defaults = [
        f"{cls.__qualname__}.{name}"
        for cls in connection_class.__mro__
        for name, value in vars(cls).items()
        if name.startswith("_pooled_pg_") and not callable(value)
    ]
    defaults += [
        f"{cls.__qualname__}.{name}"
        for cls in DatabaseWrapper.__mro__
        for name in HOT_WRAPPER_ATTRIBUTES
        if name in vars(cls)
    ]
    assert not defaults, f"set these in __init__, not on the class: {defaults}"
