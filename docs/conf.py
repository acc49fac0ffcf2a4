"""Sphinx configuration of the batchnorm documentation (build: see docs/contributing.md).

Everything the built site needs is local: MathJax is bundled (sphinx-mathjax-offline), the
theme ships its own fonts and scripts, and no intersphinx inventory is fetched.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

DOCS = Path(__file__).resolve().parent
# the checkout's own package first, so a build never documents another installed copy
sys.path.insert(0, str(DOCS.parent / "src"))

import batchnorm  # noqa: E402

project = "batchnorm"
author = "the batchnorm authors"
copyright = "2026, the batchnorm authors"  # noqa: A001
release = batchnorm.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # copies MathJax 3 into _static: math renders offline
    "numpydoc",
    "myst_parser",
    "sphinx_copybutton",
    "sphinx_gallery.gen_gallery",
]

# batchnorm.torch is written on another branch: documented only once it imports
HAS_TORCH_ADAPTER = importlib.util.find_spec("batchnorm.torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = [
    "_build",
    "**.ipynb_checkpoints",
    "gallery_src",
    "tutorial_src",
    "gallery/*.py",
    "tutorial/*.py",
]
if not HAS_TORCH_ADAPTER:  # its page (and the generated one) only once the module imports
    exclude_patterns += ["api/torch_adapter.rst", "api/generated/batchnorm.torch*"]
templates_path = ["_templates"]

# a reference to a public name that has no page fails the build; references into private
# modules (the docstrings' pointers for contributors) and to other projects (no intersphinx
# inventories are fetched) stay plain text
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(batchnorm\.)?(_\w*|core|backends|layers|adapters)(\..*)?"),
    # helpers the docstrings name that are not in their module's __all__
    (r"py:.*", r"(StateDict|convention_config|new_value_weight|DistributedError)"),
    (r"py:.*", r"_.*"),
    (r"py:.*", r"(mpi4py|numpy|os|jax|torch|flax)(\..*)?"),
]

# -- MyST --------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- autodoc, autosummary, numpydoc -------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"  # numpydoc's Parameters sections say the types
autodoc_preserve_defaults = True  # `dtype=np.float64`, not `<class ...>`
numpydoc_show_class_members = False  # the class template lists members itself
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()


def _reexported_elsewhere() -> dict[str, list[tuple[str, str]]]:
    """Per public submodule, the names of its ``__all__`` defined in another module that has
    its own page (``batchnorm.BatchStats`` on the top-level list, ``RenormCache`` on
    ``batchnorm.renorm``'s), with that page's target: the submodule's page links there
    instead of describing the object twice."""
    import importlib

    top = set(batchnorm.__all__)
    out = {}
    for name in SUBMODULES:
        module = importlib.import_module(name)
        out[name] = []
        for member in getattr(module, "__all__", []):
            home = getattr(getattr(module, member), "__module__", name)
            if home == name:
                continue
            if member in top:
                out[name].append((member, f"batchnorm.{member}"))
            elif home in SUBMODULES:
                out[name].append((member, f"{home}.{member}"))
    return out


SUBMODULES = [
    f"batchnorm.{name}"
    for name in (
        "functional conventions renorm variants recalibrate convert fold diagnostics "
        "checkpoint nn distributed gradcheck walk"
    ).split()
]
SUBMODULES += ["batchnorm.jax"] if HAS_JAX else []
SUBMODULES += ["batchnorm.torch"] if HAS_TORCH_ADAPTER else []
autosummary_context = {"exclude": _reexported_elsewhere()}

_LITERAL = re.compile(r"(``.*?``|:\w+:`.*?`|`[^`]*`_?)")
_STAR = re.compile(r"(?<![\\*\w])\*(?=[A-Za-z_])(?![^*\n]*\*(?!\w))")
_BAR = re.compile(r"(?<![\\\w|])\|(?=[^\s|][^|\n]*?[^\s|]?\|)")


def _escape_plain_text(app, what, name, obj, options, lines):
    """Docstrings are written for ``help()`` as well: a shape such as ``(*features)`` or an
    absolute value such as ``|mean|`` in plain text would start reST emphasis or a
    substitution. Escape those (outside literals, roles, math blocks and examples) before
    numpydoc."""
    in_math = in_doctest = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_doctest = True  # an example and its output run as written, to a blank line
        elif not stripped:
            in_doctest = False
        if in_doctest:
            continue
        if stripped.startswith(".. math::"):
            in_math = True
            continue
        if in_math and stripped and not line.startswith((" ", "\t")):
            in_math = False
        if in_math:
            continue
        parts = _LITERAL.split(line)
        for j in range(0, len(parts), 2):  # the even parts are outside literals
            parts[j] = _BAR.sub(r"\\|", _STAR.sub(r"\\*", parts[j]))
        lines[i] = "".join(parts)


def _adapter_conventions(app, what, name, obj, options, lines):
    """``batchnorm.jax``'s docstring points to its implementation module for the conventions;
    that module has no page of its own (it is private), so its text joins the public one."""
    if what == "module" and name == "batchnorm.jax":
        import inspect

        from batchnorm.adapters.jax import functions

        text = re.sub(
            r"\s*See\s+:mod:`batchnorm\.adapters\.jax\.functions`[^.]*\.", "", "\n".join(lines)
        )
        lines[:] = (text + "\n\n" + inspect.cleandoc(functions.__doc__)).splitlines() + [""]


# private modules whose docstring a public object refers to, and the page that shows it
_MODULE_PAGES = {"batchnorm.adapters.jax.functions": "batchnorm.jax"}
# private modules whose docstring is brought into the page of the public class they define
_INLINE_MODULES = {"batchnorm.layers.base"}


def _module_docstring_pointer(app, what, name, obj, options, lines):
    """ "(see the module docstring)" in an object shown away from its module: link to the
    module's page, or, for a private module without one, bring its text in after the
    summary."""
    marker = "(see the module docstring)"
    home = getattr(obj, "__module__", None)
    if what not in ("class", "function") or not lines or marker not in lines[0] or not home:
        return
    page = _MODULE_PAGES.get(home, home)
    if page in SUBMODULES:
        lines[0] = lines[0].replace(marker, f"(see :mod:`{page}`)")
        return
    import inspect

    lines[0] = lines[0].replace(" " + marker, "").replace(marker, "")
    if home not in _INLINE_MODULES:
        return
    end = lines.index("") if "" in lines else len(lines)  # the end of the summary paragraph
    text = inspect.cleandoc(sys.modules[home].__doc__ or "").splitlines()
    lines[end:end] = [""] + text


def _torch_adapter_toc(app, docname, source):
    """List the PyTorch adapter's API page once ``batchnorm.torch`` exists."""
    if docname == "api/index" and HAS_TORCH_ADAPTER:
        source[0] += "\n.. toctree::\n\n   torch_adapter\n"


def setup(app):
    """Connect the docstring escape (before numpydoc's own handler) and the adapter page."""
    app.connect("autodoc-process-docstring", _escape_plain_text, priority=100)
    app.connect("autodoc-process-docstring", _module_docstring_pointer, priority=80)
    if HAS_JAX:
        app.connect("autodoc-process-docstring", _adapter_conventions, priority=90)
    app.connect("source-read", _torch_adapter_toc)


# -- sphinx-gallery ------------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": ["tutorial_src", "gallery_src"],
    "gallery_dirs": ["tutorial", "gallery"],
    "filename_pattern": r"/(plot|tutorial)_",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "show_memory": False,
    "show_signature": False,
    "reset_modules": ("matplotlib",),
    "capture_repr": ("_repr_html_", "__repr__"),
    "min_reported_time": 1e9,  # no timing boxes: the page shows the maths, not the machine
    "write_computation_times": False,  # its page loads DataTables from a CDN
    "default_thumb_file": None,
}

# -- doctest (sphinx.ext.doctest: `{doctest}` blocks in pages; docstrings run under pytest) --
doctest_global_setup = "import numpy as np\nimport batchnorm as bn"

# -- HTML ---------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"batchnorm {release}"
html_static_path = ["_static"]
html_css_files = ["batchnorm.css"]
html_show_sourcelink = False
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 6,
    # the search as an icon (Ctrl+K still opens it): the wide search field pushed the search
    # and the theme switcher onto a second header row below 1600 px
    "navbar_persistent": ["search-button"],
    "navbar_align": "left",
    "icon_links": [],
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_context = {"default_mode": "light"}
# pages without siblings get the whole width (their tables and code need it)
html_sidebars = {
    name: []
    for name in ("index", "getting_started", "evidence", "changelog", "contributing", "tutorial/**")
}
