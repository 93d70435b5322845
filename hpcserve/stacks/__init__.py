"""Serving stacks: what fronts the workers on the head node and how workers join it (hpcserve.stacks.base)."""
