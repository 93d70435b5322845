"""The torch reference engine: SGLang's flags plus --torch-* options, run by hpcserve's own Python."""

from __future__ import annotations

from hpcserve.engines.base import register
from hpcserve.engines.mock import StandInEngine

register(StandInEngine("torch", "hpcserve.torchengine"))
