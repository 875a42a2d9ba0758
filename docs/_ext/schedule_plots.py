"""``schedule-plot``: a bar chart of a schedule's weights, drawn with matplotlib at build time.

    ```{schedule-plot} ema(0.7)
    ```

The argument is a call of a factory of :mod:`polyak.schedules`; the directive draws its
weights for ``n = 10`` snapshots (``:n:`` to change), oldest on the left, into
``docs/generated/`` and shows the image, so the figures can never drift from the code.
"""

from __future__ import annotations

import ast
import os
import re

from docutils.parsers.rst import directives
from docutils.parsers.rst.directives.images import Image
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

import polyak


def schedule_from_call(text: str) -> polyak.Schedule:
    """Evaluate ``factory(args)`` with literal arguments only (no arbitrary code)."""
    try:
        call = ast.parse(text.strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
            raise ValueError("not a call")
        factory = getattr(polyak.schedules, call.func.id)
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, AttributeError) as err:
        raise ExtensionError(
            f"schedule-plot: {text!r} is not a schedule factory call: {err}"
        ) from None
    return factory(*args, **kwargs)


def draw(schedule: polyak.Schedule, n: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = schedule.weights(n)
    fig, ax = plt.subplots(figsize=(5.0, 2.2), constrained_layout=True)
    ax.bar(range(1, n + 1), w, color="#3c78b4")
    ax.set_xticks(range(1, n + 1))
    ax.set_xlabel("snapshot (1 = oldest)")
    ax.set_ylabel("weight")
    ax.set_ylim(0, max(1e-9, float(w.max())) * 1.15)
    ax.set_title(f"{schedule!r}, n = {n}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=96)
    plt.close(fig)


class SchedulePlot(Image):
    required_arguments = 1
    final_argument_whitespace = True
    has_content = False
    option_spec = {**Image.option_spec, "n": directives.positive_int}

    def run(self):  # noqa: ANN201 - docutils' signature
        call = self.arguments[0]
        n = self.options.pop("n", 10)
        schedule = schedule_from_call(call)
        env = self.state.document.settings.env
        out_dir = os.path.join(env.srcdir, "generated")
        os.makedirs(out_dir, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{call}_{n}").strip("_")
        draw(schedule, n, os.path.join(out_dir, f"schedule_{slug}.png"))
        self.arguments = [f"/generated/schedule_{slug}.png"]
        self.options.setdefault("alt", f"weights of {call} for n = {n}")
        return super().run()


def setup(app: Sphinx) -> dict:
    app.add_directive("schedule-plot", SchedulePlot)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
