"""The custom-scalars dashboard: one category per module, charts grouped by question.

TensorBoard's custom-scalars plugin matches each chart's tags as regular expressions from
the start of the tag (``re.match``), so the patterns carry the logger's prefix and allow
any call suffix (``:k``) and any layer/direction, which keeps one layout valid for the
whole run even when calls or layers are only seen later.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from gradwatch._outputs.scalars import PREFIX, safe_name

__all__ = ["GLOBAL_CATEGORY", "layout_for", "module_charts"]

GLOBAL_CATEGORY = "gradwatch"

# (chart title, metric regex, per layer/direction?) in display order.
_MODULE_CHARTS: tuple[tuple[str, str, bool], ...] = (
    ("verdict (0 healthy, 1 vanishing, 2 exploding, 3 non-finite)", "verdict", False),
    ("per-step gain (1 lossless, <1 vanishing, >1 exploding)", "gain", True),
    ("gain of the actual gradient (loss-weighted)", "actual_gain", True),
    ("horizon / sequence length (1: reaches the whole sequence)", "horizon_fraction", True),
    ("horizon and e-fold time in steps (inf: never below 1%)", "(horizon|efold)", True),
    ("log10 attenuation over the sequence", "log10_attenuation", True),
    ("carried fraction of dL/dh (1: all through the recurrence)", "carried_fraction", True),
    ("||dL/dh_t||: mean, at the start, at the end", "hgrad_(mean|start|end)", True),
    (
        "recurrent weight: spectral norm, radius, Pascanu bound",
        "(weight_norm|weight_radius|pascanu_bound)",
        True,
    ),
    ("activation derivative and saturated fraction", "(act_derivative|saturation)", True),
    ("gate means", r"[^/]*_gate_mean", True),
    ("gate saturation (fraction outside [0.1, 0.9])", r"[^/]*_gate_saturation", True),
    ("LSTM forget bias b_if + b_hf", "forget_bias", True),
    ("recurrent parameter gradient norm", "param_grad_norm", False),
    ("gradient injected into the outputs (norm)", "injected_grad_norm", False),
)


def _prefix_pattern(logger_prefix: str, tag_prefix: str) -> str:
    # Lightning's TensorBoardLogger writes f"{prefix}-{tag}" when it has a prefix.
    head = f"{logger_prefix}-" if logger_prefix else ""
    return re.escape(f"{head}{tag_prefix}")


def module_charts(module: str, *, logger_prefix: str = "", prefix: str = PREFIX) -> dict[str, list]:
    """The charts of one module's category: ``{title: ["Multiline", [regex, ...]]}``.

    ``module`` is a module name (or a call name, whose ``#k`` suffix is dropped): the
    patterns cover every call of the module.
    """
    base = re.sub(r"#\d+$", "", module)
    head = f"{_prefix_pattern(logger_prefix, prefix)}/{re.escape(safe_name(base))}(?::\\d+)?/"
    charts: dict[str, list] = {}
    for title, metric, per_layer in _MODULE_CHARTS:
        pattern = head + (r"l\d+d\d+/" if per_layer else "") + metric + "$"
        if metric == "verdict":  # module verdict and per layer/direction verdicts together
            pattern = head + r"(l\d+d\d+/)?verdict$"
        charts[title] = ["Multiline", [pattern]]
    return charts


def layout_for(
    module_names: Iterable[str], *, logger_prefix: str = "", prefix: str = PREFIX
) -> dict[str, dict[str, list]]:
    """The whole dashboard in ``SummaryWriter.add_custom_scalars`` form.

    One category per module (calls of the same module share it), then a ``gradwatch``
    category with the cross-module views: every verdict, every recurrent parameter gradient
    norm and the clipping events.
    """
    layout: dict[str, dict[str, list]] = {}
    for name in module_names:
        base = re.sub(r"#\d+$", "", name)
        title = f"{GLOBAL_CATEGORY}: {base}"
        if title not in layout:
            layout[title] = module_charts(base, logger_prefix=logger_prefix, prefix=prefix)
    head = _prefix_pattern(logger_prefix, prefix)
    layout[GLOBAL_CATEGORY] = {
        "module verdicts (0 healthy, 1 vanishing, 2 exploding, 3 non-finite)": [
            "Multiline",
            [head + r"/[^/]+/verdict$"],
        ],
        "recurrent parameter gradient norms": ["Multiline", [head + r"/[^/]+/param_grad_norm$"]],
        "clipping: norm before clipping and threshold": [
            "Multiline",
            [head + r"/clip/(pre_norm|threshold)$"],
        ],
        "clipping: coefficient applied (1 = not clipped)": [
            "Multiline",
            [head + r"/clip/coefficient$"],
        ],
        "clipping: steps clipped, steps skipped for non-finite gradients (1 = yes)": [
            "Multiline",
            [head + r"/clip/(clipped|skipped)$"],
        ],
        "steps skipped by the GradScaler, gradient spikes (1 = yes)": [
            "Multiline",
            [head + r"/step/(skipped|spike)$"],
        ],
        "gradwatch's own time (fraction of the training time)": [
            "Multiline",
            [head + r"/overhead$"],
        ],
    }
    return layout
