"""The entry point TensorBoard loads (group ``tensorboard_plugins``, name ``gradwatch``).

Kept apart from `.plugin` so that TensorBoard can always import it; the plugin itself is
imported in `GradwatchLoader.load`.
"""

from __future__ import annotations

from typing import Any

from tensorboard.plugins import base_plugin

from gradwatch._outputs.tb_plugin.metadata import PLUGIN_NAME

__all__ = ["DEFAULT_SAMPLES", "GradwatchLoader"]

# TensorBoard keeps 10 samples per tag of a third-party plugin unless told otherwise
# (``--samples_per_plugin gradwatch=N``, 0 = all); the slider wants more.
DEFAULT_SAMPLES = 200


class GradwatchLoader(base_plugin.TBLoader):
    """Loads `GradwatchPlugin`."""

    def fix_flags(self, flags: Any) -> None:
        """Keep `DEFAULT_SAMPLES` steps per tag unless ``--samples_per_plugin`` says."""
        samples = getattr(flags, "samples_per_plugin", None)
        if isinstance(samples, dict):
            samples.setdefault(PLUGIN_NAME, DEFAULT_SAMPLES)

    def load(self, context: base_plugin.TBContext) -> base_plugin.TBPlugin:
        from gradwatch._outputs.tb_plugin.plugin import GradwatchPlugin

        return GradwatchPlugin(context)
