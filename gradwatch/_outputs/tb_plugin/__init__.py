"""gradwatch's TensorBoard plugin: a "gradwatch" tab with the per-timestep profiles.

``metadata`` (what `PanelWriter` writes, and how to read it
back) is importable on its own; ``loader`` is the entry point TensorBoard loads
(``tensorboard_plugins`` group); ``plugin`` serves the data and ``static/index.js``.
See docs/panels.md, "The gradwatch tab".
"""
