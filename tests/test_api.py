"""The public API surface and house conventions."""

import inspect
import subprocess
import sys

import pytest

import markov_attn as ma


def test_import_does_not_import_flax():
    code = "import sys, markov_attn; assert 'flax' not in sys.modules, 'flax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_all_lists_the_public_functions():
    assert sorted(ma.__all__) == ma.__all__
    for name in ma.__all__:
        assert callable(getattr(ma, name)), name
        assert getattr(ma, name).__doc__, name


def test_data_positional_only_options_keyword_only():
    for name in ma.__all__:
        sig = inspect.signature(getattr(ma, name))
        kinds = [p.kind for p in sig.parameters.values()]
        assert kinds[0] == inspect.Parameter.POSITIONAL_ONLY, name
        assert inspect.Parameter.POSITIONAL_OR_KEYWORD not in kinds, name


def test_docstrings_have_examples():
    for name in ma.__all__:
        assert "Examples:" in getattr(ma, name).__doc__, name


def _imports(path, module: str, *, top_level_only: bool):
    """Modules that ``path`` (module ``module``) imports: absolute names, relative ones resolved;
    ``from pkg import name`` counts as ``pkg.name`` where that is a module of the package."""
    import ast
    import pathlib

    root = pathlib.Path(ma.__file__).parent.parent
    tree = ast.parse(pathlib.Path(path).read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for a in node.names:
                sub = f"{base}.{a.name}"
                is_module = (root / sub.replace(".", "/")).with_suffix(".py").exists() or (
                    root / sub.replace(".", "/") / "__init__.py"
                ).exists()
                yield sub if is_module else base


def _library_modules():
    import pathlib

    pkg = pathlib.Path(ma.__file__).parent
    for path in sorted(pkg.rglob("*.py")):
        parts = path.relative_to(pkg.parent).with_suffix("").parts
        yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_library_never_imports_experiments():
    """``pip install .`` installs ``markov_attn`` only: nothing in it may import the
    repository's ``experiments`` (or ``tests``, ``scripts``) package, not even lazily."""
    for path, module in _library_modules():
        for name in _imports(path, module, top_level_only=False):
            assert name.split(".")[0] not in ("experiments", "tests", "scripts"), (module, name)


def test_the_library_has_no_import_cycle():
    """Imports between the library's modules form no cycle, counting the imports inside
    functions too (a lazy import that only hides a cycle counts as one)."""
    graph = {
        module: {
            n for n in _imports(path, module, top_level_only=False) if n.startswith("markov_attn")
        }
        for path, module in _library_modules()
    }
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            assert state.get(n) != "open", " -> ".join([*stack, m, n])
            if n not in state:
                visit(n, [*stack, m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_optional_subpackages_name_their_extra(monkeypatch):
    """Without Flax, `import markov_attn.nn` said only "No module named 'flax'"."""
    import importlib.util

    from markov_attn._util import require_extra

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flax" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install 'markov_attn\[nn\]'"):
        require_extra(["flax", "numpy"], "nn", "markov_attn.nn")
    require_extra(["numpy"], "nn", "markov_attn.nn")  # present: nothing raised
    import types

    monkeypatch.setitem(sys.modules, "stub_without_spec", types.ModuleType("stub_without_spec"))
    require_extra(["stub_without_spec"], "nn", "x")  # a stub in sys.modules counts as present
