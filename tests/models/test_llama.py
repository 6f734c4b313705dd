"""The Llama-style decoder and the causal LM loss, on CPU with the tiny config."""

from __future__ import annotations

import math

import pytest
import torch

from ringattn.models import (
    CONFIGS,
    CoreAttention,
    Llama,
    LlamaConfig,
    apply_rope,
    causal_lm_loss,
    flops_per_token,
    param_count,
    rope_cos_sin,
    shift_labels,
)

# float32 on CPU: the same math in a different order (a permuted shard, a blocked attention
# kernel, shifted RoPE angles) agrees to a few ulps of the O(1) activations.
ATOL = 1e-5
RTOL = 1e-5


def _tiny(**overrides) -> Llama:
    torch.manual_seed(0)
    return Llama(config=LlamaConfig.from_name("tiny", **overrides))


def _tokens(b: int, s: int, *, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CONFIGS["tiny"]["vocab_size"], (b, s), generator=_gen(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference_attention(q, k, v):
    """Dense causal attention with K/V repeated over each GQA group: [B, S, H, D] in and out."""
    g = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, Hq, S, S]
    mask = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    return (s.masked_fill(~mask, -math.inf).softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("s", [1, 37])
def test_logits_shape_and_dtype(s):
    model = _tiny().to(torch.bfloat16)
    logits = model(_tokens(2, s))
    assert logits.shape == (2, s, 256)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_causal():
    model = _tiny()
    ids = _tokens(2, 24)
    changed = ids.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 256
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15], atol=ATOL, rtol=RTOL)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4], ids=["MQA", "GQA", "MHA"])
def test_attention_matches_reference(n_kv_heads):
    model = _tiny(n_kv_heads=n_kv_heads)
    attn = model.layers[0].attention
    assert attn.wk.out_features == n_kv_heads * model.config.head_dim
    x = torch.randn(2, 19, model.config.dim, generator=_gen(2))
    pos = torch.arange(19).expand(2, 19)
    q, k, v = attn.project_qkv(x, position_ids=pos)
    assert q.shape == (2, 19, 4, 16) and k.shape == v.shape == (2, 19, n_kv_heads, 16)
    expected = attn.project_out(_reference_attention(q, k, v))
    torch.testing.assert_close(attn(x, position_ids=pos), expected, atol=ATOL, rtol=RTOL)


def test_position_ids_default_is_arange():
    model = _tiny()
    ids = _tokens(2, 21)
    default = model(ids)
    torch.testing.assert_close(model(ids, position_ids=torch.arange(21)), default)
    torch.testing.assert_close(model(ids, position_ids=torch.arange(21).expand(2, 21)), default)


def test_position_ids_shape_is_checked():
    model = _tiny()
    with pytest.raises(ValueError, match=r"expected \(8,\) or \(2, 8\)"):
        model(_tokens(2, 8), position_ids=torch.arange(9))


def test_rope_depends_only_on_relative_position():
    q = torch.randn(1, 6, 2, 16, generator=_gen(3))
    k = torch.randn(1, 6, 2, 16, generator=_gen(4))

    def scores(offset):
        pos = torch.arange(6)[None] + offset  # [1, 6]
        cos, sin = rope_cos_sin(pos, head_dim=16, theta=10000.0)
        return torch.einsum("bihd,bjhd->bhij", apply_rope(q, cos, sin), apply_rope(k, cos, sin))

    torch.testing.assert_close(scores(57), scores(0), atol=1e-4, rtol=1e-4)
    cos, sin = rope_cos_sin(torch.arange(6)[None], head_dim=16, theta=10000.0)
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1))


def test_logits_invariant_to_shifting_all_positions():
    # Positions enter only through RoPE's q.k products, which depend on differences alone.
    model = _tiny()
    ids = _tokens(2, 16)
    shifted = model(ids, position_ids=torch.arange(16) + 100)
    torch.testing.assert_close(shifted, model(ids), atol=1e-4, rtol=1e-4)


def test_project_qkv_on_a_shard_uses_global_positions():
    # A zigzag shard of 2 ranks (rank 0: chunks 0 and 3 of 4) projected with its global
    # positions gives exactly the rows of the full projection.
    attn = _tiny().layers[0].attention
    x = torch.randn(2, 16, 64, generator=_gen(5))
    full = attn.project_qkv(x, position_ids=torch.arange(16).expand(2, 16))
    idx = torch.cat([torch.arange(0, 4), torch.arange(12, 16)])
    shard = attn.project_qkv(x[:, idx], position_ids=idx.expand(2, 8))
    for got, want in zip(shard, full, strict=True):
        torch.testing.assert_close(got, want[:, idx], atol=ATOL, rtol=RTOL)


def test_core_attention_is_the_seam():
    class Recording(CoreAttention):
        calls = 0

        def forward(self, q, k, v):
            Recording.calls += 1
            return super().forward(q, k, v)

    model = _tiny()
    ids = _tokens(1, 8)
    expected = model(ids)
    for layer in model.layers:
        layer.attention.core = Recording()
    torch.testing.assert_close(model(ids), expected)
    assert Recording.calls == model.config.n_layers


def test_forward_backward():
    model = _tiny()
    ids = _tokens(2, 32)
    loss = causal_lm_loss(model(ids), shift_labels(ids))
    loss.backward()
    # Random init predicts roughly uniformly: the loss is near log(vocab).
    assert abs(loss.item() - math.log(256)) < 0.1
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_init_deterministic_and_scaled():
    a, b = _tiny(), _tiny()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    wo_std = a.layers[0].attention.wo.weight.std().item()
    wq_std = a.layers[0].attention.wq.weight.std().item()
    assert wq_std == pytest.approx(0.02, rel=0.1)
    assert wo_std == pytest.approx(0.02 / math.sqrt(2 * a.config.n_layers), rel=0.1)


def test_tied_embeddings():
    model = _tiny(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.param_count() == param_count(model.config)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("head_dim", [None, 24], ids=["derived", "head_dim24"])
def test_param_count_matches_module(tie, head_dim):
    model = _tiny(tie_embeddings=tie, head_dim=head_dim)
    assert model.param_count() == param_count(model.config)


def test_param_count_named_configs():
    # Published totals: Llama-3-8B has 8,030,261,248 parameters, Llama-3.2-1B 1,235,814,400.
    assert param_count(LlamaConfig.from_name("llama3-8b")) == 8_030_261_248
    assert param_count(LlamaConfig.from_name("llama3-1b")) == 1_235_814_400
    assert 10e6 < param_count(LlamaConfig.from_name("small")) < 100e6


def test_flops_per_token():
    c = LlamaConfig.from_name("llama3-8b")
    matmul_params = param_count(c) - c.vocab_size * c.dim - (2 * c.n_layers + 1) * c.dim
    attention = 12 * 32 * 32 * 128 * 8192
    assert flops_per_token(c, 8192, causal=False) == 6 * matmul_params + attention
    assert flops_per_token(c, 8192) == 6 * matmul_params + attention / 2


def test_config_derivation_and_errors():
    c = LlamaConfig(vocab_size=10, dim=96, n_layers=1, n_heads=6)
    assert (c.n_kv_heads, c.head_dim, c.ffn_dim) == (6, 16, 256)
    assert LlamaConfig.from_name("tiny", dim=128).head_dim == 32
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        LlamaConfig.from_name("huge")
    with pytest.raises(ValueError, match=r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        LlamaConfig.from_name("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim must be positive and even"):
        LlamaConfig.from_name("tiny", head_dim=15)


def test_shift_labels():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    expected = torch.tensor([[6, 7, 8, -100], [2, 3, 4, -100]])
    assert torch.equal(shift_labels(ids), expected)
    assert shift_labels(ids, ignore_index=-1)[:, -1].tolist() == [-1, -1]


def test_loss_matches_cross_entropy_mean():
    logits = torch.randn(2, 9, 256, generator=_gen(6))
    labels = _tokens(2, 9, seed=7)
    labels[0, 3] = labels[1, -1] = -100
    expected = torch.nn.functional.cross_entropy(
        logits.view(-1, 256), labels.view(-1), ignore_index=-100
    )
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected)
    labels[labels == -100] = 3
    labels[0, 0] = 7
    expected = torch.nn.functional.cross_entropy(
        logits.view(-1, 256), labels.view(-1), ignore_index=7
    )
    torch.testing.assert_close(causal_lm_loss(logits, labels, ignore_index=7), expected)


def test_loss_with_global_token_count_sums_over_shards():
    # Two "ranks" each hold half of the sequence; with the global count their losses add up
    # to the single-device mean.
    logits = torch.randn(1, 12, 256, generator=_gen(8))
    labels = shift_labels(_tokens(1, 12, seed=9))
    labels[0, 2] = -100
    n = int((labels != -100).sum())
    parts = [
        causal_lm_loss(logits[:, sl], labels[:, sl], num_tokens=n)
        for sl in (slice(0, 6), slice(6, 12))
    ]
    torch.testing.assert_close(sum(parts), causal_lm_loss(logits, labels))


def test_loss_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 4, 256, requires_grad=True)
    loss = causal_lm_loss(logits, torch.full((1, 4), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_loss_shape_mismatch():
    with pytest.raises(ValueError, match="do not match labels"):
        causal_lm_loss(torch.randn(1, 4, 8), torch.zeros(1, 5, dtype=torch.long))
