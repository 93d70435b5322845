"""Torch reference engine: a tiny Llama-style decoder on CPU that serves SGLang's API, with real KV transfer
between prefill and decode servers (a correctness oracle for disaggregated serving)."""
