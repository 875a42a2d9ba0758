"""Fail the build when a public name of polyak is not documented; list public names.

``api-table`` writes the one-line-per-name table of a module from its ``__all__`` (an
autosummary; for MyST pages), so the table cannot miss a name either:

    ```{api-table} polyak.schedules
    ```

For every module in ``api_coverage_modules`` (conf.py), each name in its ``__all__`` must be
documented as ``module.name`` by autodoc somewhere in the site (``__version__`` and
submodules excepted). The check runs once all pages are read, and lists every missing name.
"""

from __future__ import annotations

import importlib
import types

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.errors import ExtensionError
from sphinx.util.docutils import SphinxDirective

SKIP = {"__version__"}


def public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        raise ExtensionError(f"api_coverage: {module_name} has no __all__")
    absent = [n for n in names if not hasattr(module, n)]
    if absent:
        raise ExtensionError(f"api_coverage: {module_name}.__all__ lists {absent}, not defined")
    return [
        f"{module_name}.{n}"
        for n in names
        if n not in SKIP and not isinstance(getattr(module, n), types.ModuleType)
    ]


def check(app: Sphinx, env: BuildEnvironment) -> None:
    documented = set(env.get_domain("py").objects)
    missing = [
        name
        for module in app.config.api_coverage_modules
        for name in public_names(module)
        if name not in documented
    ]
    if missing:
        raise ExtensionError(
            "public names without API documentation (add them to docs/api/): " + ", ".join(missing)
        )


class ApiTable(SphinxDirective):
    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        # The pages are MyST Markdown, and nested content is parsed by the page's parser;
        # autosummary writes its table cells in reStructuredText, hence eval-rst.
        module = self.arguments[0]
        lines = ["```{eval-rst}", ".. autosummary::", "   :nosignatures:", ""]
        lines += [f"   {name}" for name in public_names(module)]
        lines += ["```"]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=f"api-table {module}"), 0, container)
        return container.children


def setup(app: Sphinx) -> dict:
    app.add_config_value("api_coverage_modules", [], "env")
    app.add_directive("api-table", ApiTable)
    app.connect("env-check-consistency", check)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
