"""parallelize_hf: HF Llama / Qwen2 / Mistral on the ring equal the single-process eager model,
keep causal masking, and refuse what the ring cannot honour."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ringattn.integrations.hf import (  # noqa: E402 - after importorskip
    ATTN_IMPLEMENTATION,
    UnsupportedAttentionError,
    parallelize_hf,
    register_ringattn,
    ringattn_mask,
)
from ringattn.layout import gather_sequence  # noqa: E402
from ringattn.models import causal_lm_loss, shift_labels  # noqa: E402
from ringattn.parallel import (  # noqa: E402
    allreduce_gradients,
    sequence_parallel_loss,
    shard_batch,
)
from tests._harness import run_distributed  # noqa: E402

# The first call on a worker pool imports transformers in every rank (seconds each, on 2 cores).
TIMEOUT_S = 180.0
SEQ = 24  # divisible by 2W for W in {2, 3}: every layout works
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    vocab_size=256,
)


def tiny_hf(kind="llama", seed=0, **overrides):
    """A tiny fp32 HF causal LM with random weights and the eager reference attention."""
    configs = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        # default sliding_window=4096, longer than the sequence: a no-op the ring may run
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_cls, model_cls = configs[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides}))
    model.set_attn_implementation("eager")
    return model


def tokens(seq_len=SEQ, batch=2, seed=1):
    return torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def sharded_logits(model, ids, layout="zigzag"):
    """The full [B, S, V] logits of a parallelized model run on this rank's shard."""
    batch = shard_batch(ids, layout=layout)
    out = model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return gather_sequence(out.logits.detach(), layout=layout)


def _hf_vs_single(rank, world, kind, layout):
    ids = tokens()
    labels = shift_labels(ids)
    labels[0, 3] = -100  # an ignored token somewhere
    ref = tiny_hf(kind)
    model = parallelize_hf(copy.deepcopy(ref), layout=layout)
    ref_logits = ref(ids).logits
    ref_loss = causal_lm_loss(ref_logits, labels)  # labels not given to HF: it would shift again
    ref_loss.backward()

    batch = shard_batch(ids, labels=labels, layout=layout)
    out = model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    loss = sequence_parallel_loss(out.logits, batch["labels"])
    loss.backward()
    allreduce_gradients(model)
    params = dict(model.named_parameters())
    grad_err = {
        name: (params[name].grad - p.grad).abs().max().item() for name, p in ref.named_parameters()
    }
    full_logits = gather_sequence(out.logits.detach(), layout=layout)
    return (
        (full_logits - ref_logits).abs().max().item(),
        abs(loss.item() - ref_loss.item()),
        grad_err,
    )


@pytest.mark.parametrize(
    "kind, world, layout",
    [
        ("llama", 2, "zigzag"),
        ("llama", 3, "zigzag"),
        ("qwen2", 2, "zigzag"),
        ("qwen2", 3, "zigzag"),
        ("llama", 3, "striped"),
        ("qwen2", 2, "contiguous"),
        ("mistral", 2, "zigzag"),
    ],
    ids=lambda v: f"W{v}" if isinstance(v, int) else v,
)
def test_hf_model_equals_single_process(kind, world, layout):
    for logits_err, loss_err, grad_err in run_distributed(
        _hf_vs_single, world, kind, layout, timeout=TIMEOUT_S
    ):
        # fp32 throughout; the ring changes only summation order
        assert logits_err < 1e-5 and loss_err < 1e-6
        assert max(grad_err.values()) < 1e-5, grad_err


def _causality(rank, world):
    ids = tokens()
    ref = tiny_hf("llama")
    model = parallelize_hf(copy.deepcopy(ref))
    logits = sharded_logits(model, ids)
    prefix_err, suffix_change = {}, {}
    for t in (5, 13):  # positions held by different ranks (zigzag, W=3: chunks of 4)
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 256
        other = sharded_logits(model, changed)
        prefix_err[t] = (other[:, :t] - logits[:, :t]).abs().max().item()
        suffix_change[t] = (other[:, t:] - logits[:, t:]).abs().max().item()
    causal_err = (logits - ref(ids).logits).abs().max().item()
    # a zero additive 4-D mask makes the eager reference attend to every token
    bidirectional = ref(ids, attention_mask=torch.zeros(2, 1, SEQ, SEQ)).logits.detach()
    return prefix_err, suffix_change, causal_err, (logits - bidirectional).abs().max().item()


def test_future_tokens_do_not_leak_into_the_past():
    for prefix_err, suffix_change, causal_err, vs_bidirectional in run_distributed(
        _causality, 3, timeout=TIMEOUT_S
    ):
        for t in prefix_err:
            assert prefix_err[t] == 0.0  # masked keys contribute exact zeros
            assert suffix_change[t] > 1e-3  # ...and the change does reach the later positions
        assert causal_err < 1e-5
        assert vs_bidirectional > 1e-2  # a silently non-causal run would land here


def _positions(rank, world):
    ids = tokens()
    ref = tiny_hf("qwen2")
    model = parallelize_hf(copy.deepcopy(ref))
    batch = shard_batch(ids)
    wrong = {
        "omitted": {},  # HF's default: the local arange(S/W), wrong RoPE on every rank here
        "packed": {"position_ids": batch["position_ids"] % (SEQ // 2)},  # two documents
    }
    errors = {}
    for case, kwargs in wrong.items():
        try:
            model(batch["input_ids"], use_cache=False, **kwargs)
            errors[case] = None
        except UnsupportedAttentionError as err:
            errors[case] = str(err)
    right_err = (sharded_logits(model, ids) - ref(ids).logits).abs().max().item()
    return errors, right_err


def test_position_ids_must_be_global_positions():
    for errors, right_err in run_distributed(_positions, 2, timeout=TIMEOUT_S):
        assert right_err < 1e-5  # zigzag shards are not contiguous: RoPE used the global positions
        for message in errors.values():
            assert message is not None and "position_ids other than this rank's global" in message


# Single process from here on (world of one rank): the checks are per rank and need no peers.


def _raises(model, ids=None, **kwargs) -> str:
    ids = tokens() if ids is None else ids
    with pytest.raises(UnsupportedAttentionError) as info:
        model(ids, **kwargs)
    return str(info.value)


def _padding():
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, -3:] = 0  # right padding in one row
    return _raises(parallelize_hf(tiny_hf()), attention_mask=mask)


def _mask_overlay():  # what transformers passes when or/and_mask_function are composed in
    with pytest.raises(UnsupportedAttentionError) as info:
        ringattn_mask(2, SEQ, SEQ, use_vmap=True)
    return str(info.value)


UNSUPPORTED = {
    "padding": (_padding, "padding (an attention_mask with zeros) is not supported"),
    "4d-mask": (
        lambda: _raises(parallelize_hf(tiny_hf()), attention_mask=torch.zeros(2, 1, SEQ, SEQ)),
        "an explicit attention mask is not supported",
    ),
    "sliding-qwen2": (
        lambda: _raises(
            parallelize_hf(
                tiny_hf("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)
            )
        ),
        "sliding-window attention is not supported: Qwen2Attention has a window of 8 tokens",
    ),
    "sliding-mistral": (
        lambda: _raises(parallelize_hf(tiny_hf("mistral", sliding_window=8))),
        "sliding-window attention is not supported: MistralAttention",
    ),
    "dropout": (
        lambda: _raises(parallelize_hf(tiny_hf(attention_dropout=0.1)).train()),
        "attention dropout is not supported: LlamaAttention asked for dropout p=0.1",
    ),
    "non-causal": (
        lambda: _raises(parallelize_hf(tiny_hf(is_causal=False))),
        "non-causal (bidirectional) attention is not supported",
    ),
    "mask-overlay": (_mask_overlay, "a custom mask overlay"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_cases_raise_naming_the_case(case):
    call, expected = UNSUPPORTED[case]
    assert expected in call()


def test_kv_cache_decoding_raises():
    model = parallelize_hf(tiny_hf())
    ids = tokens()
    cache = model(ids, use_cache=True).cache  # a prefill is a whole sequence: fine
    message = _raises(model, ids[:, :1], cache=cache, position_ids=torch.tensor([[SEQ]]))
    assert "KV-cache decoding" in message


def test_harmless_settings_are_accepted():
    ids = tokens()
    ref = tiny_hf(attention_dropout=0.1).eval()  # dropout is off outside training
    expected = ref(ids).logits
    model = parallelize_hf(copy.deepcopy(ref))
    ones = torch.ones_like(ids)  # a padding mask without padding
    assert (model(ids, attention_mask=ones).logits - expected).abs().max() < 1e-5
    mistral = tiny_hf("mistral")  # sliding_window=4096 > SEQ
    assert (
        parallelize_hf(copy.deepcopy(mistral))(ids).logits - mistral(ids).logits
    ).abs().max() < 1e-5


def test_parallelize_hf_switches_the_implementation():
    model = parallelize_hf(tiny_hf(), layout="striped")
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    settings = [m.ringattn_settings for m in model.modules() if hasattr(m, "ringattn_settings")]
    assert len(settings) == TINY["num_hidden_layers"]
    assert {(s.group, s.layout, s.backend) for s in settings} == {(None, "striped", None)}


def test_ringattn_without_parallelize_hf_raises():
    register_ringattn()
    model = tiny_hf()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    with pytest.raises(RuntimeError, match="parallelize_hf"):
        model(tokens())


def test_parallelize_hf_bad_arguments():
    with pytest.raises(ValueError, match="no attention module"):
        parallelize_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown layout 'spiral'"):
        parallelize_hf(tiny_hf(), layout="spiral")


def test_too_old_transformers_raises_naming_the_version(monkeypatch):
    monkeypatch.delattr(transformers.masking_utils, "AttentionMaskInterface")
    with pytest.raises(ImportError, match=r"transformers >= 4\.56 .*found"):
        register_ringattn()
