"""Hugging Face style model directories: config.json + model.safetensors (torch.save's
pytorch_model.bin when the safetensors package is missing)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hpcserve.torchengine.model import TinyConfig, TinyLlama


class CheckpointError(Exception):
    pass


def _safetensors():
    try:
        import safetensors.torch as st
        return st
    except ImportError:
        return None


def save(model: TinyLlama, directory: str | Path) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    st = _safetensors()
    if st is not None:
        st.save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, d / "pytorch_model.bin")
    return d


def load(directory: str | Path) -> TinyLlama:
    d = Path(directory)
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d} has no config.json (give a Hugging Face style model directory or 'random')")
    try:
        cfg = TinyConfig.from_hf(json.loads((d / "config.json").read_text()))
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{d}/config.json is not a Llama config this engine can run: {err}") from None
    if (d / "model.safetensors").is_file():
        st = _safetensors()
        if st is None:
            raise CheckpointError(f"{d} holds model.safetensors: pip install safetensors")
        state = st.load_file(str(d / "model.safetensors"))
    elif (d / "pytorch_model.bin").is_file():
        state = torch.load(d / "pytorch_model.bin", weights_only=True)
    else:
        raise CheckpointError(f"{d} has neither model.safetensors nor pytorch_model.bin")
    model = TinyLlama(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{d}: weights do not match config.json: {str(err).splitlines()[0]}") from None
    return model.eval()
