"""The public API's docstrings: every public name has an Examples section, and every example runs.

The public names are those of ``zoblackbox.__all__``, ``zoblackbox.schedule.__all__`` and
``zoblackbox.adapters.__all__`` (the generated API reference, docs/api.md). Their examples, and
those of their methods, run here as doctests, so a docstring example that stops working fails
``make test``; the documentation build (``make docs``) checks the numpydoc sections themselves.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import time

import pytest
import torch

CATALOGUES = ("zoblackbox", "zoblackbox.schedule", "zoblackbox.adapters")
# plain values, documented in docs/api.md by hand (a docstring cannot be attached to a str or a tuple)
CONSTANTS = {"zoblackbox.__version__", "zoblackbox.adapters.BN_POLICIES"}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def public_objects() -> list[tuple[str, object]]:
    out = []
    for module_name in CATALOGUES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            full = f"{module_name}.{name}"
            if full not in CONSTANTS:
                out.append((full, getattr(module, name)))
    return out


def doctests_of(full: str, obj) -> list[doctest.DocTest]:
    """The doctests of ``obj``'s docstring and of its own methods' (not inherited ones)."""
    finder = doctest.DocTestFinder(recurse=False)
    tests = finder.find(obj, full, globs={})
    if inspect.isclass(obj):
        for attr, member in vars(obj).items():
            member = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
            member = member.fget if isinstance(member, property) else member
            if not attr.startswith("_") and getattr(member, "__doc__", None) and callable(member):
                tests += finder.find(member, f"{full}.{attr}", globs={})
    return [t for t in tests if t.examples]


PUBLIC = public_objects()


def test_the_catalogues_are_what_the_reference_documents():
    # 38 names in zoblackbox.__all__ (one a constant), 9 in schedule, 4 in adapters (one a constant)
    assert len(PUBLIC) == 37 + 9 + 3, [n for n, _ in PUBLIC]


@pytest.mark.parametrize("full,obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_public_name_has_a_numpydoc_examples_section_with_a_doctest(full, obj):
    doc = inspect.getdoc(obj) or ""
    assert "\nExamples\n--------\n" in doc, f"{full}: no numpydoc Examples section"
    own = doctest.DocTestFinder(recurse=False).find(obj, full, globs={})
    assert own and own[0].examples, f"{full}: the Examples section has no doctest"


def test_every_public_example_runs():
    """All examples in one run (about 15 s on two cores); a failure names the object and the line."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    t0 = time.perf_counter()
    try:
        for full, obj in PUBLIC:
            for test in doctests_of(full, obj):
                runner.run(test)
    finally:
        torch.set_num_threads(threads)
    results = runner.summarize(verbose=False)
    elapsed = time.perf_counter() - t0
    print(f"{results.attempted} doctest examples of {len(PUBLIC)} public names in {elapsed:.1f} s")
    assert results.failed == 0, f"{results.failed} of {results.attempted} doctest examples failed (output above)"
    assert results.attempted >= 3 * len(PUBLIC)
