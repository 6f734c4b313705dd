"""Hugging Face transformers models on ring attention: the `"ringattn"` attention implementation.

    from ringattn.integrations.hf import parallelize_hf
    from ringattn.parallel import allreduce_gradients, sequence_parallel_loss, shard_batch

    model = LlamaForCausalLM(config)                         # any HF causal LM (Llama, Qwen2, ...)
    parallelize_hf(model, group=sp_group, layout="zigzag")   # attention -> ring_attention
    batch = shard_batch(input_ids, group=sp_group, layout="zigzag")
    logits = model(
        batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    ).logits                                                 # [B, S/W, V]: this rank's tokens
    loss = sequence_parallel_loss(logits, batch["labels"], group=sp_group)
    loss.backward()
    allreduce_gradients(model, group=sp_group)               # each rank saw S/W tokens

Rules for the caller:
- Pass `position_ids` (the global positions `shard_batch` returns): HF's default is the local
  `arange(S/W)`, which gives RoPE the wrong positions. Checked: other positions raise.
- Do not pass `labels` to the model. HF's loss shifts the labels again inside the shard (so the
  last token of each shard loses its target) and averages per rank; `shard_batch` shifts the
  labels on the full sequence and `sequence_parallel_loss` averages over all ranks.
- `use_cache=False` in training: otherwise HF builds a KV cache it never reads.

How masking is kept honest. transformers builds the attention mask through the mask interface
registered under the implementation's name and hands the result to the attention function. The
`"ringattn"` mask function returns None (nothing to materialize: the ring applies causal
masking itself, by global position, through `ring_attention(causal=True)`), and the two
functions together refuse, with an `UnsupportedAttentionError` naming the case, every mask the
ring cannot honour: padding (an `attention_mask` with zeros), a prepared 4-D mask, custom mask
overlays, sliding windows shorter than the sequence, non-causal (bidirectional) attention,
attention dropout, packed sequences (position_ids that are not this rank's global positions), and
KV-cache decoding. Like transformers' own flash-attention mask, the mask function does not read
the pattern function it is given: under layouts whose shards are not contiguous, transformers
mistakes the gaps in `position_ids` for packed sequences and composes a packing mask; the
attention function checks the positions instead (one comparison per layer: on GPU, a host
sync). Not detectable, hence not refused: the `block_sequence_ids` overlays of multimodal models,
for which transformers gives the mask function no signal; ringattn targets text decoders.

A check that fails on some ranks only (right padding lands on the rank holding the last chunk)
raises there at once; its peers then stop in the ring with a `RingTimeoutError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ringattn.layout import check_layout, group_rank_and_size, sequence_positions
from ringattn.ring import ring_attention

ATTN_IMPLEMENTATION = "ringattn"
MIN_TRANSFORMERS = "4.56"  # AttentionInterface, AttentionMaskInterface, set_attn_implementation
SETTINGS_ATTR = "ringattn_settings"  # attribute that parallelize_hf sets on attention modules


class UnsupportedAttentionError(ValueError):
    """The model asked for attention that the ring cannot compute exactly (the case is named)."""


@dataclass(frozen=True)
class RingSettings:
    """How one attention module's sequence is split: read by the attention function."""

    group: dist.ProcessGroup | None
    layout: str
    backend: str | None


def _interfaces():
    """transformers' (AttentionInterface, AttentionMaskInterface); ImportError naming the
    version needed when transformers is missing or too old."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            f"ringattn.integrations.hf needs transformers >= {MIN_TRANSFORMERS} "
            "(pip install 'ringattn[hf]')"
        ) from err
    try:
        from transformers import AttentionInterface, PreTrainedModel
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as err:
        raise ImportError(
            f"ringattn.integrations.hf needs transformers >= {MIN_TRANSFORMERS} for "
            f"AttentionInterface and AttentionMaskInterface; found {transformers.__version__}"
        ) from err
    if not hasattr(PreTrainedModel, "set_attn_implementation"):
        raise ImportError(
            f"ringattn.integrations.hf needs transformers >= {MIN_TRANSFORMERS} for "
            f"PreTrainedModel.set_attn_implementation; found {transformers.__version__}"
        )
    return AttentionInterface, AttentionMaskInterface


def register_ringattn() -> None:
    """Register `"ringattn"` in transformers' attention and mask interfaces (idempotent).

    Both together: an attention implementation without a mask function of the same name gets no
    mask at all from transformers, padding included.

    Raises:
        ImportError: transformers missing or older than `MIN_TRANSFORMERS`.
    """
    attention_interface, mask_interface = _interfaces()
    attention_interface.register(ATTN_IMPLEMENTATION, ringattn_attention_forward)
    mask_interface.register(ATTN_IMPLEMENTATION, ringattn_mask)


def _unsupported(case: str, detail: str) -> UnsupportedAttentionError:
    return UnsupportedAttentionError(f"ringattn: {case} is not supported: {detail}")


def ringattn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> None:
    """The `"ringattn"` mask function (transformers' mask interface): always None, or raises.

    Args:
        attention_mask: [B, kv_length] bool padding mask from the caller, or None.
        kwargs: transformers passes `config`, and `use_vmap=True` exactly when user-supplied
            mask overlays (`or_mask_function` / `and_mask_function`) are composed in.

    Raises:
        UnsupportedAttentionError: padding, a bidirectional mask, or a custom mask overlay.
    """
    if attention_mask is not None and not bool(attention_mask.all()):
        raise _unsupported(
            "padding (an attention_mask with zeros)",
            "the ring attends over every token of the sharded sequence; pack or trim the "
            "batch so that no token is padding, and pass attention_mask=None",
        )
    config = kwargs.get("config")
    if config is not None and not getattr(config, "is_causal", True):
        raise _unsupported("non-causal (bidirectional) attention", "config.is_causal is False")
    if kwargs.get("use_vmap"):
        raise _unsupported(
            "a custom mask overlay (or_mask_function / and_mask_function)",
            "the ring applies plain causal masking by global position only",
        )
    return None


def _check_call(module, query, key, attention_mask, dropout, kwargs, settings) -> None:
    """Raise for anything the ring cannot honour; query/key are HF's [B, H, S, D]."""
    name = type(module).__name__
    if attention_mask is not None:
        raise _unsupported(
            "an explicit attention mask",
            f"{name} received a prepared mask of shape {tuple(attention_mask.shape)}; the ring "
            "applies causal masking itself (pass attention_mask=None or all ones)",
        )
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise _unsupported("non-causal attention", f"{name} is not causal")
    if dropout:
        raise _unsupported(
            "attention dropout",
            f"{name} asked for dropout p={dropout} in training mode; set "
            "config.attention_dropout = 0.0",
        )
    for kwarg in ("softcap", "s_aux"):
        if kwargs.get(kwarg) is not None:
            raise _unsupported(f"{kwarg!r}", f"{name} passed {kwarg}={kwargs[kwarg]!r}")
    if key.shape[2] != query.shape[2]:
        raise _unsupported(
            "KV-cache decoding",
            f"{name} got {query.shape[2]} queries against {key.shape[2]} cached keys; the ring "
            "runs whole sharded sequences (training, prefill)",
        )
    _, world = group_rank_and_size(settings.group)
    seq_len = query.shape[2] * world
    if "sliding_window" in kwargs:
        window = kwargs["sliding_window"]
    else:
        config_window = getattr(getattr(module, "config", None), "sliding_window", None)
        window = getattr(module, "sliding_window", config_window)
    if window is not None and window < seq_len:
        raise _unsupported(
            "sliding-window attention",
            f"{name} has a window of {window} tokens, shorter than the sequence of {seq_len} "
            f"({query.shape[2]} tokens x {world} ranks)",
        )
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        expected = sequence_positions(seq_len, group=settings.group, layout=settings.layout)
        expected = expected.to(position_ids.device)
        if position_ids.shape[-1] != expected.shape[0] or not bool(
            (position_ids == expected).all()
        ):
            raise _unsupported(
                "position_ids other than this rank's global positions",
                f"expected {expected[:8].tolist()}... (layout {settings.layout!r}, "
                f"{seq_len} tokens), got {position_ids.reshape(-1)[:8].tolist()}...; pass "
                "shard_batch(...)['position_ids'] (packed sequences are not supported)",
            )


def ringattn_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The `"ringattn"` attention function (transformers' attention interface).

    Args:
        module: the HF attention module; `parallelize_hf` put its `RingSettings` on it.
        query: [B, Hq, S/W, D] this rank's queries (HF layout), positions from `position_ids`.
        key, value: [B, Hkv, S/W, D], not repeated for GQA (the ring handles Hq % Hkv == 0).
        attention_mask: must be None (what `ringattn_mask` returns).
        scaling: softmax scale (default D ** -0.5).
        dropout: must be 0.
        kwargs: from the model; `position_ids`, `sliding_window`, `is_causal` are checked.

    Returns:
        (attn_output [B, S/W, Hq, D], None): no attention weights are materialized.
    """
    settings = getattr(module, SETTINGS_ATTR, None)
    if settings is None:
        raise RuntimeError(
            f"ringattn: {type(module).__name__} has no sequence-parallel settings; call "
            "ringattn.integrations.hf.parallelize_hf(model, group=..., layout=...) instead of "
            f"setting attn_implementation={ATTN_IMPLEMENTATION!r} directly"
        )
    _check_call(module, query, key, attention_mask, dropout, kwargs, settings)
    out = ring_attention(
        query.transpose(1, 2),  # [B, S/W, Hq, D]
        key.transpose(1, 2),  # [B, S/W, Hkv, D]
        value.transpose(1, 2),
        causal=True,
        softmax_scale=scaling,
        group=settings.group,
        layout=settings.layout,
        backend=settings.backend,
    )
    return out, None


def parallelize_hf(
    model: nn.Module,
    *,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    backend: str | None = None,
) -> nn.Module:
    """Run a Hugging Face model's attention as ring attention over `group`, in place.

    Registers `"ringattn"` (attention and mask functions), switches the model to it with
    `model.set_attn_implementation`, and puts a `RingSettings(group, layout, backend)` on every
    attention module (a module with an `is_causal` attribute, transformers' convention) as
    `ringattn_settings`. Feed the model this rank's shard with its global `position_ids`
    (`ringattn.parallel.shard_batch`) and compute the loss with
    `ringattn.parallel.sequence_parallel_loss` on the logits; see the module docstring.

    Args:
        model: a transformers `PreTrainedModel` (tested: LlamaForCausalLM, Qwen2ForCausalLM).
        group: process group holding the sequence (default: the world group).
        layout: "zigzag" (default) | "striped" | "contiguous".
        backend: "triton" | "torch" | None (by device), as for `ring_attention`.

    Returns:
        The model.

    Raises:
        ImportError: transformers missing or too old.
        ValueError: unknown layout, a group without torch.distributed, or no attention module.
    """
    check_layout(layout)
    group_rank_and_size(group)  # a group without torch.distributed raises here, not mid-forward
    register_ringattn()
    attention = [m for m in model.modules() if hasattr(m, "is_causal")]
    if not attention:
        raise ValueError(
            f"parallelize_hf: {type(model).__name__} has no attention module (none has an "
            "`is_causal` attribute)"
        )
    settings = RingSettings(group=group, layout=layout, backend=backend)
    for module in attention:
        setattr(module, SETTINGS_ATTR, settings)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model
