"""A Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU) as plain single-device code.

Sequence parallelism is applied from outside, never written in here: every attention layer
keeps its softmax(QK^T)V in a `CoreAttention` submodule (`model.layers[i].attention.core`) that
a parallelizer swaps for ring attention, and RoPE rotates by explicit global `position_ids`,
so a rank that holds a non-contiguous shard of the sequence (zigzag, striped) still rotates
each token by its true position. An inference path reuses `Attention.project_qkv` and
`Attention.project_out` around its own (paged, cached) attention.

Random initialization only; no weights are downloaded. RoPE uses the rotate-half convention
of Hugging Face transformers (the first and second halves of the head dimension form the
rotated pairs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ringattn.flash import flash_attn


@dataclass
class LlamaConfig:
    """Shapes and constants of a Llama-style decoder.

    Attributes:
        vocab_size: number of token ids.
        dim: model (residual stream) width.
        n_layers: number of decoder blocks.
        n_heads: query heads per attention layer.
        n_kv_heads: key/value heads (GQA); must divide `n_heads`. Default: `n_heads` (MHA).
        head_dim: width of one head. Default: `dim // n_heads`; may be set independently.
        ffn_dim: SwiGLU hidden width. Default: Llama's 8/3 * dim rounded up to a multiple of 256.
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        max_seq_len: the longest sequence the config is meant for (training and cache sizing).
            RoPE is computed from `position_ids` on the fly, so it does not cap positions.
        tie_embeddings: share the token embedding matrix with the LM head.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads != 0:
                raise ValueError(
                    f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads}); "
                    "set head_dim explicitly"
                )
            self.head_dim = self.dim // self.n_heads
        if self.head_dim <= 0 or self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be positive and even for RoPE, got {self.head_dim}")
        if self.ffn_dim is None:
            self.ffn_dim = 256 * math.ceil(8 * self.dim / 3 / 256)
        if self.ffn_dim <= 0:
            raise ValueError(f"ffn_dim must be positive, got {self.ffn_dim}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LlamaConfig:
        """The named config from `CONFIGS`, with keyword `overrides` applied before derivation.

        Example: `LlamaConfig.from_name("small", max_seq_len=32768)`.
        """
        if name not in CONFIGS:
            raise ValueError(f"unknown config {name!r}; expected one of {sorted(CONFIGS)}")
        return cls(**{**CONFIGS[name], **overrides})


# Keyword arguments of `LlamaConfig`, by name (kept as dicts so that an override of, say, `dim`
# re-derives head_dim and ffn_dim).
CONFIGS: dict[str, dict[str, Any]] = {
    # Unit tests: a forward + backward takes milliseconds on CPU.
    "tiny": dict(
        vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256
    ),
    # CPU demos: ~29M parameters.
    "small": dict(
        vocab_size=8192,
        dim=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=4,
        ffn_dim=1536,
        max_seq_len=4096,
        tie_embeddings=True,
    ),
    # Llama-3.2-1B shapes (without its RoPE frequency scaling): ~1.24B parameters.
    "llama3-1b": dict(
        vocab_size=128256,
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=8192,
        rope_theta=500000.0,
        max_seq_len=8192,
        tie_embeddings=True,
    ),
    # Llama-3-8B shapes: 8.03B parameters.
    "llama3-8b": dict(
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
}


def param_count(config: LlamaConfig) -> int:
    """Number of parameters of `Llama(config=config)`, from the config alone (no allocation)."""
    c = config
    attention = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)  # wq, wo, wk, wv
    feed_forward = 3 * c.dim * c.ffn_dim  # w1, w2, w3
    block = attention + feed_forward + 2 * c.dim  # + two RMSNorm weights
    embeddings = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
    return c.n_layers * block + embeddings + c.dim  # + final RMSNorm


def flops_per_token(config: LlamaConfig, seq_len: int, *, causal: bool = True) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`.

        6 * N  +  12 * L * H * D * S * (0.5 if causal else 1)

    N counts the weights of every matrix multiply: all linears of the blocks and the LM head,
    not the embedding lookup (which does no arithmetic) nor the norms. Each such weight costs 2
    FLOPs per token forward and 4 backward. Attention adds, per layer and query head, 2*S*D for
    QK^T and 2*S*D for PV forward (x3 with backward); causal masking halves it. L layers,
    H query heads, D head_dim, S seq_len.
    """
    c = config
    n = param_count(c) - c.vocab_size * c.dim * (0 if c.tie_embeddings else 1)
    n -= c.n_layers * 2 * c.dim + c.dim  # norms are elementwise
    attention = 12 * c.n_layers * c.n_heads * c.head_dim * seq_len
    return 6 * n + attention * (0.5 if causal else 1.0)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back to x's dtype."""

    def __init__(self, dim: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cos_sin(
    position_ids: torch.Tensor, *, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation angles for RoPE: position_ids [B, S] -> cos, sin [B, S, head_dim // 2] float32.

    Pair i of the head dimension turns by position * theta ** (-2i / head_dim).
    """
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
    inv_freq = theta ** (-exponents / head_dim)  # [D/2]
    angles = position_ids.float()[..., None] * inv_freq  # [B, S, D/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, D] by cos, sin [B, S, D/2] (rotate-half pairs: i and i + D/2).

    Computed in float32, returned in x's dtype.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, S, H, D/2] each
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, S, 1, D/2]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # [B, S, H, D]
    return out.type_as(x)


class CoreAttention(nn.Module):
    """Causal softmax attention over [B, S, H, D] tensors; the seam that parallelize() replaces."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, S, Hq, D], k/v [B, S, Hkv, D] -> [B, S, Hq, D]. GQA is handled by flash_attn."""
        return flash_attn(q, k, v, causal=True)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE.

    `forward` = `project_qkv` -> `core` -> `project_out`; the two projections are public so that
    a decode path with its own KV cache can reuse them around a different attention.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.core = CoreAttention()

    def project_qkv(
        self, x: torch.Tensor, *, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project and rotate.

        Args:
            x: [B, S, dim].
            position_ids: [B, S] global position of each token of x (what RoPE rotates by).

        Returns:
            q [B, S, Hq, D] and k [B, S, Hkv, D], both rotated; v [B, S, Hkv, D].
        """
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)  # [B, S, Hq, D]
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)  # [B, S, Hkv, D]
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)  # [B, S, Hkv, D]
        cos, sin = rope_cos_sin(position_ids, head_dim=self.head_dim, theta=self.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def project_out(self, attn_out: torch.Tensor) -> torch.Tensor:
        """attn_out [B, S, Hq, D] -> [B, S, dim]."""
        b, s, _, _ = attn_out.shape
        return self.wo(attn_out.reshape(b, s, self.n_heads * self.head_dim))  # [B, S, Hq*D]

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor) -> torch.Tensor:
        """x [B, S, dim], position_ids [B, S] -> [B, S, dim]."""
        q, k, v = self.project_qkv(x, position_ids=position_ids)
        return self.project_out(self.core(q, k, v))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, dim] -> [B, S, dim]."""
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm decoder block: x + attention(norm(x)), then h + feed_forward(norm(h))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(dim=config.dim, hidden_dim=config.ffn_dim)

    def forward(self, x: torch.Tensor, *, position_ids: torch.Tensor) -> torch.Tensor:
        """x [B, S, dim], position_ids [B, S] -> [B, S, dim]."""
        h = x + self.attention(self.attention_norm(x), position_ids=position_ids)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Token embedding -> `n_layers` TransformerBlocks -> RMSNorm -> LM head.

    Blocks live in `self.layers` (an nn.ModuleList) so that they can be wrapped from outside
    (activation checkpointing, FSDP). Parameters are initialized by `init_weights`.
    """

    def __init__(self, *, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, *, std: float = 0.02) -> None:
        """Linears and embeddings ~ N(0, std); the projections that write into the residual
        stream (attention.wo, feed_forward.w2) ~ N(0, std / sqrt(2 * n_layers)), so the
        residual's variance does not grow with depth; norm weights = 1. Deterministic under
        torch.manual_seed. Also the way to initialize a model built on the meta device after
        `to_empty`."""
        out_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        for layer in self.layers:
            for linear in (layer.attention.wq, layer.attention.wk, layer.attention.wv):
                nn.init.normal_(linear.weight, mean=0.0, std=std)
            nn.init.normal_(layer.feed_forward.w1.weight, mean=0.0, std=std)
            nn.init.normal_(layer.feed_forward.w3.weight, mean=0.0, std=std)
            nn.init.normal_(layer.attention.wo.weight, mean=0.0, std=out_std)
            nn.init.normal_(layer.feed_forward.w2.weight, mean=0.0, std=out_std)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if not self.config.tie_embeddings:
            nn.init.normal_(self.output.weight, mean=0.0, std=std)

    def param_count(self) -> int:
        """Number of distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits.

        Args:
            input_ids: [B, S] token ids (under sequence parallelism: this rank's shard).
            position_ids: [B, S] or [S] global position of each token; default arange(S).
                A sequence-parallel caller passes `sequence_positions(...)` of its shard.

        Returns:
            logits [B, S, vocab_size] float32.
        """
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device)
        if position_ids.shape not in ((s,), (b, s)):
            raise ValueError(
                f"position_ids of shape {tuple(position_ids.shape)} do not match input_ids "
                f"of shape {(b, s)}; expected ({s},) or ({b}, {s})"
            )
        position_ids = position_ids.expand(b, s)  # [B, S]
        h = self.tok_embeddings(input_ids)  # [B, S, dim]
        for layer in self.layers:
            h = layer(h, position_ids=position_ids)
        return self.output(self.norm(h)).float()  # [B, S, V]
