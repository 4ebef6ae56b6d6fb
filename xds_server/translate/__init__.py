"""Translators: pure functions from the mesh model to Envoy resources (no I/O, no clock)."""
