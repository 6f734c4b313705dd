"""Model code written for one device; parallelism is applied from outside."""

from ringattn.models.llama import (
    CONFIGS,
    Attention,
    CoreAttention,
    FeedForward,
    Llama,
    LlamaConfig,
    RMSNorm,
    TransformerBlock,
    apply_rope,
    flops_per_token,
    param_count,
    rope_cos_sin,
)
from ringattn.models.loss import causal_lm_loss, shift_labels

__all__ = [
    "CONFIGS",
    "Attention",
    "CoreAttention",
    "FeedForward",
    "Llama",
    "LlamaConfig",
    "RMSNorm",
    "TransformerBlock",
    "apply_rope",
    "causal_lm_loss",
    "flops_per_token",
    "param_count",
    "rope_cos_sin",
    "shift_labels",
]
