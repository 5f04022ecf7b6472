"""Sphinx configuration of the zoblackbox documentation (``make docs``).

The build is offline (no intersphinx, no downloads) and strict: ``make docs`` runs ``sphinx-build -W
--keep-going`` with ``nitpicky`` on, so an unresolved reference to a zoblackbox name, a docstring of a
public name missing a numpydoc section, or a gallery example that raises fails it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the checkout, so that `import zoblackbox` documents these sources

os.environ.setdefault("MPLBACKEND", "Agg")
# the gallery runs on the build machine's CPUs: keep torch from oversubscribing them
os.environ.setdefault("OMP_NUM_THREADS", "1")

import zoblackbox

project = "zoblackbox"
author = "zoblackbox developers"
copyright = "zoblackbox developers"
release = zoblackbox.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "examples/*.py", "examples/GALLERY_HEADER.rst", "auto_examples/*.ipynb",
                    "auto_examples/*.py", "auto_examples/*.zip", "sg_execution_times.rst"]

# -- strictness ------------------------------------------------------------------------------------
nitpicky = True
# Third-party names cannot be resolved without intersphinx (the build is offline): ignore those, by
# package. zoblackbox's own names are never listed here, so a broken reference to one fails the build.
_THIRD_PARTY = r"(torch|numpy|np|scipy|sklearn|gymnasium|gym|dask|distributed|loky|concurrent|pathlib|os|collections|typing|collections\.abc|abc|enum|threading|subprocess|cma)"
nitpick_ignore_regex = [
    (r"py:.*", _THIRD_PARTY + r"\..*"),
]

# -- API reference -----------------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": False}
autodoc_typehints = "none"  # types are in the numpydoc Parameters sections
autodoc_member_order = "bysource"
add_module_names = False

numpydoc_show_class_members = False  # the class template lists the methods itself
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_attributes_as_param_list = True
# Validation of every public docstring during the build: a missing summary, Parameters entry,
# Returns section or Examples section is an error (with -W). Methods of the public classes are
# rendered on their class's page but validated by the doctest run (tests/test_docstrings.py) only.
numpydoc_validation_checks = {
    "GL08",  # no docstring
    "SS01",  # no summary
    "PR01",  # a parameter of the signature not documented
    "PR02",  # a documented parameter not in the signature
    "PR07",  # a parameter without a description
    "RT01",  # no Returns section (functions that return something)
    "EX01",  # no Examples section
}
numpydoc_validation_exclude = {
    r"^zoblackbox(\.schedule|\.adapters)?\.[A-Za-z_]+\.[A-Za-z_]+$",  # members of public classes
    r"\.__version__$",
    r"\.BN_POLICIES$",
}

# -- Markdown user guide -------------------------------------------------------------------------------
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

# -- gallery -------------------------------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",  # executed; every gallery example is a plot_*.py
    # the older scripts (run by tests/test_process_oracle.py and by hand) are not gallery pages
    "ignore_pattern": r"(ode_sim|fit_ode|fit_spring)\.py$",
    "download_all_examples": False,
    "plot_gallery": "True",
    "abort_on_example_error": False,
    "only_warn_on_example_error": False,  # an example that raises fails the build, by name
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "capture_repr": ("_repr_html_", "__repr__"),
}

# -- HTML ---------------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"zoblackbox {release}"
html_static_path: list[str] = []
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_show_sourcelink = False


# -- references by module path -------------------------------------------------------------------------
# Docstrings may name a public object by the module that defines it (``zoblackbox.oracle.Oracle``);
# the reference documents it under its public path (``zoblackbox.Oracle``). Resolve the former to the
# latter (same object). Anything else of zoblackbox that is not documented stays an error.
def _public_aliases() -> dict[str, str]:
    import importlib

    aliases = {}
    for module_name in ("zoblackbox", "zoblackbox.schedule", "zoblackbox.adapters"):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            defined = getattr(obj, "__module__", None)
            qualname = getattr(obj, "__qualname__", None)
            if defined and qualname and isinstance(defined, str) and defined.startswith("zoblackbox"):
                canonical = f"{defined}.{qualname}"
                if canonical != f"{module_name}.{name}":
                    aliases[canonical] = f"{module_name}.{name}"
    return aliases


def _resolve_alias(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    for canonical, public in app.config._zob_aliases.items():
        if target == canonical or target.startswith(canonical + "."):
            new = public + target[len(canonical):]
            domain = env.get_domain("py")
            return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], new, node, contnode)
    return None


def setup(app):
    app.config._zob_aliases = _public_aliases()
    app.connect("missing-reference", _resolve_alias)
