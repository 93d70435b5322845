"""A tiny Llama-style decoder (RMSNorm, RoPE, causal attention with grouped KV heads, SwiGLU).

Parameter names follow Hugging Face's LlamaForCausalLM so a saved directory looks like a real checkpoint.
One sequence at a time: the KV cache is a list of (k, v) per layer, each [kv_heads, seq, head_dim].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from hpcserve.engine_shell.tokenizer import VOCAB_SIZE

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = VOCAB_SIZE
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq: int = 2048

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.n_heads} heads of even size and the heads "
                             f"into {self.n_kv_heads} KV groups")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_hf(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
                "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
                "intermediate_size": self.ffn_dim, "rope_theta": self.rope_theta, "rms_norm_eps": self.norm_eps,
                "max_position_embeddings": self.max_seq, "tie_word_embeddings": False, "hidden_act": "silu"}

    @classmethod
    def from_hf(cls, d: dict) -> "TinyConfig":
        return cls(vocab_size=int(d["vocab_size"]), dim=int(d["hidden_size"]), n_layers=int(d["num_hidden_layers"]),
                   n_heads=int(d["num_attention_heads"]),
                   n_kv_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
                   ffn_dim=int(d["intermediate_size"]), rope_theta=float(d.get("rope_theta", 10000.0)),
                   norm_eps=float(d.get("rms_norm_eps", 1e-5)), max_seq=int(d.get("max_position_embeddings", 2048)))

    def describe(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Rotary position embedding (HF's rotate_half layout) for x [heads, T, head_dim] at positions start.."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    pos = torch.arange(start, start + x.shape[-2], dtype=torch.float32)
    ang = torch.outer(pos, inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, start: int, past: tuple[torch.Tensor, torch.Tensor] | None):
        cfg, t = self.cfg, x.shape[0]
        hd = cfg.head_dim
        q = rope(self.q_proj(x).view(t, cfg.n_heads, hd).transpose(0, 1), start, cfg.rope_theta)
        k = rope(self.k_proj(x).view(t, cfg.n_kv_heads, hd).transpose(0, 1), start, cfg.rope_theta)
        v = self.v_proj(x).view(t, cfg.n_kv_heads, hd).transpose(0, 1)
        if past is not None:
            k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)
        rep = cfg.n_heads // cfg.n_kv_heads
        kk, vv = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        scores = (q @ kk.transpose(1, 2)) / hd ** 0.5           # [heads, t, total]
        total = kk.shape[1]
        # query i sits at position start+i and sees keys 0..start+i
        mask = torch.arange(total)[None, :] > (torch.arange(t)[:, None] + start)
        scores = scores.masked_fill(mask, float("-inf"))
        out = torch.softmax(scores, -1) @ vv                      # [heads, t, hd]
        return self.o_proj(out.transpose(0, 1).reshape(t, cfg.n_heads * hd)), (k.contiguous(), v.contiguous())


class MLP(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, start, past):
        a, kv = self.self_attn(self.input_layernorm(x), start, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Decoder(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class TinyLlama(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @classmethod
    def random(cls, cfg: TinyConfig, seed: int = 0) -> "TinyLlama":
        """Seeded random weights; std large enough that greedy logits are rarely near ties."""
        m = cls(cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.fill_(1.0)
                else:
                    fan_in = p.shape[-1] if name != "model.embed_tokens.weight" else 1
                    p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        return m.eval()

    @torch.no_grad()
    def forward(self, ids: list[int], start: int, cache: KVCache | None, all_logits: bool = False):
        """Logits of the last position and the grown cache, for tokens ``ids`` at positions start..; with
        ``all_logits`` also the logits of every earlier position (prompt log-probabilities). The last
        position's logits go through the same calls either way, so sampling never depends on the flag."""
        if start + len(ids) > self.cfg.max_seq:
            raise ValueError(f"sequence of {start + len(ids)} tokens exceeds the model's {self.cfg.max_seq}")
        x = self.model.embed_tokens(torch.tensor(ids, dtype=torch.long))
        new: KVCache = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, start, cache[i] if cache else None)
            new.append(kv)
        last = self.lm_head(self.model.norm(x[-1:]))[0]
        if all_logits:
            return last, new, self.lm_head(self.model.norm(x[:-1]))
        return last, new
