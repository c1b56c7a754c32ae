"""Shared vocabulary of every layer: errors and the names of verdicts, kinds and gates."""
