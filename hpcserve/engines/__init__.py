"""Engines: how each kind of inference server is launched (registry in hpcserve.engines.base)."""
