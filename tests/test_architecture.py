"""The package structure holds: imports only point down the layers (no circles), the runtime never imports the
research code, and a method is one file."""
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "python" / "accel"

#: accel's packages from the bottom up; a module may import its own package and anything in a lower layer
LAYERS = [
    {"accel._version", "accel.errors"},
    {"accel.config", "accel.compat", "accel._ext", "accel._adapters"},
    {"accel.plan"},  # the plan schema and the shipped plans
    {"accel.ops", "accel.cache"},  # kernels (C++ / Triton / CUDA / torch reference) and accel's cache
    {"accel.models"},  # architecture adapters and loading
    {"accel.attention"},  # decode / sparse / ragged primitives, masks, selection
    {"accel.policies"},  # one file per method
    {"accel.patching"},  # hooks and the LM runtime that routes attention to the policy
    {"accel.vlm", "accel.tpla"},  # the VLM and MLA patchers
    {"accel.api"},  # patch(): picks the patcher from its table
    {"accel.eval", "accel.perf"},
    {"accel.calibration", "accel.scheduler"},  # the calibrators (above the policies whose plans they make), the cost model
    {"accel.research"},  # research-only code: never imported by anything below
    {"accel.cli"},
    {"accel.__main__", "accel"},  # the package root: a lazy public surface over accel.api
]


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield ".".join(parts), path, is_pkg


MODULES = {name: (path, is_pkg) for name, path, is_pkg in _modules()}


def _imports(name):
    """Every accel module ``name`` imports, at module level or inside functions."""
    path, is_pkg = MODULES[name]
    base = name if is_pkg else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                target = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            out.update(subs if len(subs) == len(node.names) else [target, *subs])
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {t for t in out if t in MODULES and t != name}


def _layer(module):
    best = None
    for i, layer in enumerate(LAYERS):
        for pkg in layer:
            if module == pkg or module.startswith(pkg + "."):
                if best is None or len(pkg) > len(best[1]):
                    best = (i, pkg)
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py"
    return best


def test_every_module_is_in_a_layer():
    for name in MODULES:
        _layer(name)


def test_imports_only_point_down():
    bad = []
    for name in MODULES:
        li, pkg = _layer(name)
        for target in _imports(name):
            lj, tpkg = _layer(target)
            if lj > li or (lj == li and tpkg != pkg):
                bad.append(f"{name} -> {target}")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(sorted(bad))


def test_no_import_circles_between_packages():
    def pkg(m):
        return ".".join(m.split(".")[:2])

    graph = {}
    for name in MODULES:
        for target in _imports(name):
            if pkg(target) != pkg(name):
                graph.setdefault(pkg(name), set()).add(pkg(target))
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
        if n in seen:
            return
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            visit(m)
        stack.pop()
        seen.add(n)

    for n in sorted(graph):
        visit(n)


def test_the_runtime_never_imports_research_code():
    runtime = [n for n in MODULES if not n.startswith(("accel.research", "accel.cli", "accel.__main__"))]
    for name in runtime:
        assert not any(t.startswith("accel.research") for t in _imports(name)), name


def test_one_policy_per_file():
    from accel.policies.registry import _LAZY

    files = {}
    for name, ref in _LAZY.items():
        files.setdefault(ref.split(":")[0], []).append(name)
    assert all(len(v) == 1 for v in files.values()), files
    for path in (ROOT / "policies").glob("*.py"):
        assert path.read_text().count("@register_policy(") <= 1, path


@pytest.mark.parametrize("name", sorted(__import__("accel.policies.registry", fromlist=["_LAZY"])._LAZY))
def test_each_registered_policy_resolves_and_names_its_paper(name):
    cls = importlib.import_module("accel").get_policy_class(name)
    assert cls.name == name
    module = importlib.import_module(cls.__module__)
    assert module.__doc__ or cls.__doc__, f"{name}: its module or class must say which paper / project it implements"


def test_calibratable_policies_are_discovered_from_the_registry():
    import accel

    assert set(accel.list_calibratable()) == {"hylra", "duo", "moa", "tca", "flux", "auto"}
    for name in accel.list_calibratable():
        cal = importlib.import_module("accel.policies.registry").get_calibrator(name)
        assert "progress" in cal.options
