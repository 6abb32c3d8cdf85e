"""The package's shape, checked from its source: imports point down, names shadow nothing.

core (everything under lazybuild/ but the command line) <- components (builder, exporter, frontend,
mounter, snapshotter) <- the command line (lazybuild/cli). A core module imports only core; a
component imports core, itself, and another component only through that component's public API (its
package's `__all__`), never its modules; only the command line wires components together.
"""

from __future__ import annotations

import ast
import os
import sys

import lazybuild

from support import REPO
COMPONENTS = {"builder": "builder", "exporter": "exporter", "frontend": "frontend", "mounter": "mounter",
              "snapshotter": "snapshotter"}


def _modules():
    """(module name, path) of every module of the package, as the installed names."""
    roots = {"lazybuild": os.path.join(REPO, "lazybuild")}
    roots.update({f"lazybuild.{name}": os.path.join(REPO, folder) for name, folder in COMPONENTS.items()})
    for pkg, root in roots.items():
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            rel = os.path.relpath(dirpath, root)
            prefix = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py") and not f.endswith(("_pb2.py", "_pb2_grpc.py")):
                    mod = prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
                    yield mod, os.path.join(dirpath, f), f == "__init__.py"


def _area(module: str) -> str:
    """'cli', a component's name, or 'core'."""
    parts = module.split(".")
    if len(parts) > 1 and (parts[1] in COMPONENTS or parts[1] == "cli"):
        return parts[1]
    return "core"


def _imports(module: str, path: str, is_package: bool):
    """(imported module, names taken from it, line) for every import of the package inside MODULE."""
    tree = ast.parse(open(path).read(), path)
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lazybuild"):
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("lazybuild"):
                names = [a.name for a in node.names]
                # `from lazybuild import mounter` imports the module lazybuild.mounter
                subs = [n for n in names if f"{target}.{n}".split(".")[1:2] and _area(f"{target}.{n}") != "core"]
                if target == "lazybuild" and subs:
                    for n in subs:
                        yield f"lazybuild.{n}", [], node.lineno
                    names = [n for n in names if n not in subs]
                    if not names:
                        continue
                yield target, names, node.lineno


def test_imports_point_down():
    wrong = []
    for module, path, is_package in _modules():
        mine = _area(module)
        for target, names, line in _imports(module, path, is_package):
            theirs = _area(target)
            where = f"{os.path.relpath(path, REPO)}:{line} imports {target}"
            if mine == "cli" or theirs == mine:
                continue
            if theirs == "cli":
                wrong.append(f"{where}: only the command line imports the command line")
            elif mine == "core" and theirs != "core":
                wrong.append(f"{where}: core imports no component")
            elif theirs != "core":
                public = getattr(__import__(f"lazybuild.{theirs}", fromlist=["__all__"]), "__all__", [])
                if target != f"lazybuild.{theirs}" or not all(n in public for n in names):
                    wrong.append(f"{where} {names}: a component uses another only through its public API "
                                 f"(lazybuild.{theirs}.__all__)")
    assert not wrong, "\n".join(wrong)


def test_testing_uses_the_standard_library_and_core_only():
    """lazybuild.testing (local services for tests, benches and examples) imports the standard library and
    core modules only, and nothing else in the package imports it."""
    wrong = []
    for module, path, _ in _modules():
        inside = module == "lazybuild.testing" or module.startswith("lazybuild.testing.")
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "lazybuild"]
            else:
                continue
            where = f"{os.path.relpath(path, REPO)}:{node.lineno}"
            for name in names:
                top = name.split(".")[0]
                if inside and top != "lazybuild" and top not in sys.stdlib_module_names:
                    wrong.append(f"{where} imports {name}: lazybuild.testing uses the standard library only")
                elif inside and top == "lazybuild" and _area(name) != "core":
                    wrong.append(f"{where} imports {name}: lazybuild.testing uses core modules only")
                elif not inside and (name == "lazybuild.testing" or name.startswith("lazybuild.testing.")):
                    wrong.append(f"{where} imports {name}: only tests, benches and examples use lazybuild.testing")
    assert not wrong, "\n".join(wrong)


def test_no_module_shadows_the_standard_library():
    shadows = []
    for module, path, _ in _modules():
        last = module.rsplit(".", 1)[-1]
        if last in sys.stdlib_module_names and not module.endswith("__main__"):
            shadows.append(f"{os.path.relpath(path, REPO)} ({last})")
    assert not shadows, f"modules named like the standard library's: {shadows}"


def test_no_folder_is_named_build():
    """Of the package's own folders (build/ at the top is setuptools' output, ignored by git)."""
    folders = {os.path.dirname(path) for _, path, _ in _modules()}
    named = [f for f in folders if "build" in os.path.relpath(f, REPO).split(os.sep)]
    assert not named, f"folders named build (what every tool takes for build output): {named}"


def test_the_package_is_the_checkout():
    assert os.path.dirname(lazybuild.__file__) == os.path.join(REPO, "lazybuild")
