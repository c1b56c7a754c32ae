"""Adapters: the Lightning callback and the plain-PyTorch Monitor, both thin over the engine."""
