"""The tag scheme of gradwatch's scalars, torch-free: shared by the writers
(`gradwatch._outputs.scalars`) and the readers (``gradwatch report``).

```text
gradwatch/<module>/l<layer>d<direction>/<metric>   per layer and direction
gradwatch/<module>/<metric>                        per module call
gradwatch/clip/<metric>                            clipping events (global)
gradwatch/step/<metric>                            per-step signals (global)
gradwatch/overhead                                 gradwatch's own time / training time
```
"""

from __future__ import annotations

import re

from gradwatch._base.vocabulary import VERDICTS

__all__ = [
    "CLIP_METRICS",
    "LAYER_METRICS",
    "MODULE_METRICS",
    "OVERHEAD_METRIC",
    "PREFIX",
    "STEP_METRICS",
    "VERDICT_CODES",
    "layer_tag",
    "module_tag",
    "safe_name",
]

PREFIX = "gradwatch"

# Charts need numbers: the verdict as an ordinal, worse is higher.
VERDICT_CODES: dict[str, float] = {v: float(i) for i, v in enumerate(VERDICTS)}

# Per layer and direction, in dashboard order. Gate metrics are added per gate name:
# ``<gate>_gate_mean`` and ``<gate>_gate_saturation``.
LAYER_METRICS = (
    "gain",
    "actual_gain",
    "horizon",
    "horizon_fraction",
    "efold",
    "log10_attenuation",
    "carried_fraction",
    "hgrad_mean",
    "hgrad_start",
    "hgrad_end",
    "weight_norm",
    "weight_radius",
    "pascanu_bound",
    "act_derivative",
    "saturation",
    "forget_bias",
    "verdict",
)
MODULE_METRICS = ("verdict", "seq_len", "fidelity", "nonfinite_timestep", "param_grad_norm")
CLIP_METRICS = ("pre_norm", "threshold", "coefficient", "clipped")
# ``skipped``: the GradScaler skipped the step; ``spike``: the detector saw a spike.
STEP_METRICS = ("skipped", "spike")
# ``gradwatch/overhead``: gradwatch's own time so far as a fraction of the training time.
OVERHEAD_METRIC = "overhead"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\-]")


def safe_name(name: str) -> str:
    """A call name as used in tags: one path segment, accepted by TensorBoard, W&B and MLflow."""
    name = re.sub(r"#(\d+)$", r":\1", name)
    return _UNSAFE.sub("_", name) or "_"


def module_tag(module: str, metric: str, prefix: str = PREFIX) -> str:
    """``gradwatch/<module>/<metric>`` for a call or module name."""
    return f"{prefix}/{safe_name(module)}/{metric}"


def layer_tag(module: str, layer: int, direction: int, metric: str, prefix: str = PREFIX) -> str:
    """``gradwatch/<module>/l<layer>d<direction>/<metric>``."""
    return f"{prefix}/{safe_name(module)}/l{layer}d{direction}/{metric}"
