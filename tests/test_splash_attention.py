"""Splash attention (the TPU Pallas kernel, `attn_impl="splash"`) in interpret mode on CPU.

Against the `xla` path: values on every non-padding query and gradients through packed
rows with padding, GQA, T not a multiple of 128, inside the decoder, sharded on the
8-device mesh (its shard_map), and one training run against the same run with `xla`.
That it compiles for a real TPU is tests/test_tpu_plan.py (needs libtpu).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oisd_jax import parallel
from oisd_jax.model import ModelConfig
from oisd_jax.model.splash_attention import block_for, splash_attention
from test_blocked_attention import _inputs, decoder_value_and_grads, xla_attention


def test_block_for_pads_to_lanes():
    assert block_for(80, 512) == (128, 128)
    assert block_for(9216, 512) == (9216, 512)
    assert block_for(4096 + 1, 512) == (4224, 384)  # 33 x 128: the largest 128-multiple block dividing it
    assert block_for(300, 64) == (384, 128)


@pytest.mark.parametrize("T,N,K", [(80, 4, 2), (200, 6, 3)])
def test_values_and_grads_match_xla(T, N, K):
    q, k, v, seg = _inputs(2, T, N, K, 32, seed=T)
    scale = 32 ** -0.5
    valid = (np.asarray(seg) != 0)[..., None, None]
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * valid
    loss = lambda attn: (lambda q, k, v: jnp.sum(attn(q, k, v) * w))
    splash = lambda q, k, v: splash_attention(q, k, v, seg, scale=scale, block_size=128)
    ref = lambda q, k, v: xla_attention(q, k, v, seg, scale)
    got, want = np.asarray(jax.jit(splash)(q, k, v)), np.asarray(ref(q, k, v))
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=2e-6, rtol=1e-5)
    gs = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
    gx = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(gs, gx):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=1e-4)


def test_sharded_equals_unsharded():
    """Batch over (data, fsdp), heads over tensor through the shard_map: same values and grads."""
    q, k, v, seg = _inputs(4, 64, 8, 4, 16, seed=5)
    seg = seg.at[2:].set(seg[:2])
    valid = (seg != 0)[..., None, None]
    f = lambda q, k, v, seg: splash_attention(q, k, v, seg, scale=0.3)
    loss = lambda q, k, v, seg: jnp.sum(jnp.sin(f(q, k, v, seg)) * valid)
    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v, seg)
    mesh = parallel.make_mesh((2, 2, 2))
    sh = lambda *axes: parallel.sharding_for(axes, mesh)
    args = (jax.device_put(q, sh("batch", "seq", "q_heads", "head_dim")),
            jax.device_put(k, sh("batch", "seq", "kv_heads", "head_dim")),
            jax.device_put(v, sh("batch", "seq", "kv_heads", "head_dim")),
            jax.device_put(seg, sh("batch", "seq")))
    with jax.set_mesh(mesh):
        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
    assert len(got[1][0].sharding.device_set) == 8
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), got, want)


def test_decoder_splash_equals_xla_values_and_grads():
    cfg = ModelConfig.preset("tiny").replace(num_layers=2, remat_policy="nothing_saveable")
    (ls, gs), (lx, gx) = decoder_value_and_grads(cfg, ("splash", "xla"))
    np.testing.assert_allclose(ls, lx, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6 * np.abs(b).max(), rtol=1e-4), gs, gx)


def test_training_with_splash_equals_xla(tmp_path):
    """The trainer end to end (sampler prefill and train step both through the kernel):
    two RL steps with attn_impl=splash log what the same run with xla logs."""
    from oisd_jax.train import train
    from test_train import tiny
    runs = {}
    for impl in ("splash", "xla"):
        c = tiny(model__attn_impl=impl, train__steps=2, train__checkpoint_every=0, train__sft_warmup_steps=0)
        runs[impl] = train(c, str(tmp_path / impl))
    s, x = runs["splash"], runs["xla"]
    assert s["reward"] == x["reward"]
    np.testing.assert_allclose(s["loss"], x["loss"], rtol=1e-4, atol=1e-6)
