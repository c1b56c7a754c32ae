"""``gradwatch report``: read the event files gradwatch wrote, summarise, compare, gate CI.

Torch-free and Lightning-free by design (checked by a test): it reads TensorBoard event
files with TensorBoard's protos and renders text, JSON and a self-contained HTML page.
"""
