"""Fail on private-API use of our dependencies (issue 13): stdlib only, reads the code's AST.

Two rules, each violation printed as ``path:line: what``, exit status 1 if any is not allowed:

(a) No import of a private module or name of celery, redis, kombu, billiard, vine, amqp or click:
    a dotted path with a segment starting with ``_`` (``from celery._state import x``,
    ``import redis._parsers``, ``importlib.import_module("kombu._x")``) or a private name
    imported from them (``from celery import _state``). Checked in the library and in the
    ``--also`` directories (tests, benchmarks, the example project).

(b) In the library only: no attribute access ``<expr>._name`` (single leading underscore, not a
    dunder), also spelled ``getattr(x, "_name")``, unless ``_name`` is defined somewhere in the
    library itself (a function, class, method, module, assigned name, ``self._x``/``cls._x``
    attribute, dataclass field, argument or ``__slots__`` entry). Our own private names on our
    own objects pass; ``conn._sock`` or ``celery._state`` do not.

Exceptions live in the allow-list (default ``.ci/private-api-allow.txt``), one per line:
``path:name  # why`` where ``name`` is the attribute (``_sock``) or the dotted import
(``celery._state._task_stack``). Every entry needs a reason after ``#``; an entry that matches
nothing is reported as a note so the list shrinks back to empty.

    python .ci/check_private_api.py [--library DIR]... [--also DIR]... [--allow FILE] [--keys]
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: Packages whose private modules and names we must not use.
DEPENDENCIES = frozenset({"celery", "redis", "kombu", "billiard", "vine", "amqp", "click"})
#: Built-ins that take an attribute name as a string.
ATTRIBUTE_FUNCTIONS = frozenset({"getattr", "setattr", "hasattr", "delattr"})


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    #: What the allow-list names: the attribute, or the dotted module or name imported.
    name: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


#: Underscore names that are documented public API: namedtuple methods (the underscore only keeps
#: them from clashing with field names; urllib.parse's SplitResult is one).
NAMEDTUPLE_API = frozenset({"_replace", "_asdict", "_fields", "_field_defaults", "_make"})


def is_private(name: str) -> bool:
    """A single-underscore name: ``_x`` (not ``__x__``), other than namedtuple's public API."""
    if name in NAMEDTUPLE_API:
        return False
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def python_files(directories: Iterable[Path]) -> Iterator[Path]:
    for directory in directories:
        if directory.is_file():
            yield directory
        else:
            yield from sorted(p for p in directory.rglob("*.py") if ".venv" not in p.parts)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def defined_names(files: Iterable[Path]) -> set[str]:
    """Every name the library defines: modules, functions, classes and methods, module globals
    (import aliases included), class attributes and dataclass fields, ``self._x``/``cls._x``
    attributes and ``__slots__`` entries. Local variables and arguments do not count, so
    ``_sock = conn._sock`` cannot make ``_sock`` look like ours."""
    names: set[str] = set()
    for path in files:
        names.add(path.stem)  # modules: celery_lock._identity
        tree = parse(path)
        _scope_names(tree.body, names)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
                if isinstance(node, ast.ClassDef):
                    _scope_names(node.body, names)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):
                names.add(node.attr)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                names.update(_slots(node))
    return names


def _scope_names(body: list[ast.stmt], names: set[str]) -> None:
    """Names bound directly in a module or class body (not inside its functions)."""
    for statement in body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[0])


def _slots(node: ast.Assign | ast.AnnAssign) -> Iterator[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    if not any(isinstance(t, ast.Name) and t.id == "__slots__" for t in targets):
        return
    if isinstance(node.value, (ast.Tuple, ast.List, ast.Set)):
        for element in node.value.elts:
            if isinstance(element, ast.Constant) and isinstance(element.value, str):
                yield element.value


def private_module(dotted: str) -> bool:
    """A dependency's module path with a private segment (``celery._state``)."""
    parts = dotted.split(".")
    return parts[0] in DEPENDENCIES and any(is_private(p) for p in parts[1:])


def import_violations(path: str, tree: ast.Module) -> Iterator[Violation]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if private_module(alias.name):
                    yield Violation(path, node.lineno, alias.name, f"import of {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in DEPENDENCIES:
                continue
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                if private_module(node.module) or is_private(alias.name):
                    yield Violation(path, node.lineno, dotted, f"import of {dotted}")
        elif (
            isinstance(node, ast.Call)
            and _called_name(node.func) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and private_module(node.args[0].value)
        ):
            dotted = node.args[0].value
            yield Violation(path, node.lineno, dotted, f"import of {dotted}")


def attribute_violations(path: str, tree: ast.Module, defined: set[str]) -> Iterator[Violation]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            if node.attr not in defined:
                owner = _short(ast.unparse(node.value))
                yield Violation(
                    path, node.lineno, node.attr, f"private attribute {owner}.{node.attr}"
                )
        elif (
            isinstance(node, ast.Call)
            and _called_name(node.func) in ATTRIBUTE_FUNCTIONS
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and is_private(node.args[1].value)
            and node.args[1].value not in defined
        ):
            name = node.args[1].value
            owner = _short(ast.unparse(node.args[0]))
            what = f"private attribute {owner}.{name} (via {_called_name(node.func)})"
            yield Violation(path, node.lineno, name, what)


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def read_allow_list(path: Path) -> tuple[set[tuple[str, str]], list[str]]:
    """``{(path, name)}`` allowed, and problems with the file itself."""
    allowed: set[tuple[str, str]] = set()
    problems: list[str] = []
    if not path.exists():
        return allowed, problems
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entry, _, reason = line.partition("#")
        where, _, name = entry.strip().rpartition(":")
        if not where or not name:
            problems.append(f"{path}:{number}: not 'path:name  # why': {raw!r}")
        elif not reason.strip():
            problems.append(f"{path}:{number}: allow-list entry without a reason: {raw!r}")
        else:
            allowed.add((where, name))
    return allowed, problems


def relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", action="append", type=Path, help="default: celery_lock")
    parser.add_argument(
        "--also", action="append", type=Path, help="default: tests benchmarks example_project"
    )
    parser.add_argument("--allow", type=Path, default=Path(".ci/private-api-allow.txt"))
    parser.add_argument(
        "--keys", action="store_true", help="print every use as an allow-list key, then exit 0"
    )
    args = parser.parse_args(argv)
    library = args.library or [Path("celery_lock")]
    also = (
        args.also
        if args.also is not None
        else [Path(p) for p in ("tests", "benchmarks", "example_project") if Path(p).exists()]
    )

    library_files = list(python_files(library))
    defined = defined_names(library_files)
    found: list[Violation] = []
    for file in library_files:
        tree = parse(file)
        found.extend(import_violations(relative(file), tree))
        found.extend(attribute_violations(relative(file), tree, defined))
    for file in python_files(also):
        found.extend(import_violations(relative(file), parse(file)))

    if args.keys:
        for key in sorted({f"{v.path}:{v.name}" for v in found}):
            print(key)
        return 0
    allowed, problems = read_allow_list(args.allow)
    failures = [v for v in found if (v.path, v.name) not in allowed]
    used = {(v.path, v.name) for v in found}
    for line in problems:
        print(line)
    for violation in sorted(failures, key=lambda v: (v.path, v.line, v.name)):
        print(violation)
    for where, name in sorted(allowed - used):
        print(f"note: allow-list entry {where}:{name} matches nothing; remove it")
    return 1 if failures or problems else 0


if __name__ == "__main__":
    sys.exit(main())
