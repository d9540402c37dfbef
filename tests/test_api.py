"""The public API surface and house conventions."""

import inspect
import subprocess
import sys

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
