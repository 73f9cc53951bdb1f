"""Chunked unembedding terms: NumPy reference values, chunked == unchunked (values and
grads), closed-form grads, and compiled temporary memory that scales with the chunk,
not with tokens x vocab."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oisd_jax.rl.chunked import token_terms

N, T, D, V = 2, 13, 8, 50  # T is not a multiple of the chunk sizes used below
TEMP, TAU = 0.8, 1.5


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_terms(h, w, tgt, hl, temp, tau):
    h, w, hl = (np.asarray(x, np.float64) for x in (h, w, hl))
    z, zl = h @ w, hl @ w
    lp = np_log_softmax(z / temp)
    logp = np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    ent = -(np.exp(lp) * lp).sum(-1)
    lpl = np_log_softmax(zl / temp)
    lens_ent = -(np.exp(lpl) * lpl).sum(-1)
    ps, pt = np.exp(np_log_softmax(zl / tau)), np.exp(np_log_softmax(z / tau))
    m = 0.5 * (ps + pt)
    js = 0.5 * (ps * np.log(ps / m)).sum(-1) + 0.5 * (pt * np.log(pt / m)).sum(-1)
    return {"logp": logp, "entropy": ent, "js": js, "lens_entropy": lens_ent}


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(N, T, D)).astype(np.float32)
    hl = rng.normal(size=(N, T, D)).astype(np.float32)
    w = (rng.normal(size=(D, V)) * 0.7).astype(np.float32)
    tgt = rng.integers(0, V, size=(N, T)).astype(np.int32)
    return h, w, hl, tgt


@pytest.mark.parametrize("chunk", [None, 4, 5])
def test_values_match_numpy(inputs, chunk):
    h, w, hl, tgt = inputs
    f = jax.jit(functools.partial(token_terms, temperature=TEMP, tau=TAU, chunk_size=chunk))
    out = f(h, w, tgt, h_lens_NTD=hl)
    ref = np_terms(h, w, tgt, hl, TEMP, TAU)
    assert set(out) == set(ref)
    for k in ref:
        assert out[k].shape == (N, T) and out[k].dtype == jnp.float32
        np.testing.assert_allclose(out[k], ref[k], rtol=2e-5, atol=2e-6, err_msg=k)
    no_lens = token_terms(h, w, tgt, temperature=TEMP, chunk_size=chunk, want_entropy=False)
    assert set(no_lens) == {"logp"}


def _loss(h, w, hl, tgt, chunk):
    out = token_terms(h, w, tgt, temperature=TEMP, tau=TAU, chunk_size=chunk, h_lens_NTD=hl)
    # Arbitrary per-token weights so every token's gradient is checked, not just a sum.
    wts = jnp.linspace(-1.0, 2.0, N * T).reshape(N, T)
    return jnp.sum(wts * out["logp"]) + jnp.sum(wts[:, ::-1] * out["js"]) + jnp.sum(out["entropy"])


def test_chunked_grads_equal_unchunked(inputs):
    h, w, hl, tgt = inputs
    g = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1, 2)), static_argnums=4)
    v_ref, g_ref = g(h, w, hl, tgt, None)
    for chunk in (4, 6):
        v, grads = g(h, w, hl, tgt, chunk)
        np.testing.assert_allclose(v, v_ref, rtol=1e-5)
        for name, a, b in zip(("h_final", "w", "h_lens"), grads, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"{name} chunk={chunk}")


def test_grads_closed_form(inputs):
    """d logp / dz = (onehot - p) / T_s; d JS / dz_l = p_l (g - <p_l, g>) / tau; W gets both."""
    h, w, hl, tgt = inputs

    def f(h, w, hl):
        out = token_terms(h, w, tgt, temperature=TEMP, tau=TAU, chunk_size=5, h_lens_NTD=hl)
        return jnp.sum(out["logp"]) + jnp.sum(out["js"]) + jnp.sum(out["entropy"])

    gh, gw, ghl = jax.grad(f, argnums=(0, 1, 2))(h, w, hl)
    h64, w64, hl64 = (x.astype(np.float64) for x in (h, w, hl))
    z, zl = h64 @ w64, hl64 @ w64
    dz = (np.eye(V)[tgt] - np.exp(np_log_softmax(z / TEMP))) / TEMP  # entropy carries no grad
    ps, pt = np.exp(np_log_softmax(zl / TAU)), np.exp(np_log_softmax(z / TAU))
    g = 0.5 * np.log(ps / (0.5 * (ps + pt)))
    dzl = ps * (g - (ps * g).sum(-1, keepdims=True)) / TAU  # teacher gets nothing
    np.testing.assert_allclose(gh, dz @ w64.T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ghl, dzl @ w64.T, rtol=1e-4, atol=1e-6)
    want_w = np.einsum("ntd,ntv->dv", h64, dz) + np.einsum("ntd,ntv->dv", hl64, dzl)
    np.testing.assert_allclose(gw, want_w, rtol=1e-4, atol=1e-6)


def test_entropy_gradient_flag(inputs):
    h, w, _, tgt = inputs
    def ent(h, eg, chunk):
        return jnp.sum(token_terms(h, w, tgt, chunk_size=chunk, entropy_grad=eg)["entropy"])

    grad = jax.jit(jax.grad(ent), static_argnums=(1, 2))
    assert np.all(np.asarray(grad(h, False, 4)) == 0.0)
    g, g_ref = grad(h, True, 4), grad(h, True, None)
    assert np.abs(np.asarray(g)).max() > 0
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)


def test_bf16_compute(inputs):
    h, w, hl, tgt = inputs
    out = jax.jit(functools.partial(token_terms, chunk_size=4, temperature=TEMP, tau=TAU,
                                    compute_dtype=jnp.bfloat16))(
        jnp.asarray(h, jnp.bfloat16), jnp.asarray(w), tgt, h_lens_NTD=jnp.asarray(hl, jnp.bfloat16))
    # Reference on the bf16-rounded inputs: only the rounding of the operands may differ.
    r = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    ref = np_terms(r(h), r(w), tgt, r(hl), TEMP, TAU)
    for k in ref:
        assert out[k].dtype == jnp.float32
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-4, atol=1e-4, err_msg=k)
    g = jax.grad(lambda w: jnp.sum(token_terms(jnp.asarray(h, jnp.bfloat16), w, tgt, chunk_size=4,
                                               compute_dtype=jnp.bfloat16)["logp"]))(jnp.asarray(w))
    assert g.dtype == jnp.float32 and np.all(np.isfinite(g))


def _temp_bytes(t, chunk, v=32768, d=64):
    def f(h, w, hl, tgt):
        out = token_terms(h, w, tgt, chunk_size=chunk, h_lens_NTD=hl)
        return jnp.sum(out["logp"]) + jnp.sum(out["js"])

    args = (jax.ShapeDtypeStruct((1, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((1, t, d), jnp.float32), jax.ShapeDtypeStruct((1, t), jnp.int32))
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_temp_memory_scales_with_chunk_not_tokens_times_vocab():
    v = 32768
    t1, t4 = _temp_bytes(1024, 256), _temp_bytes(4096, 256)
    # 4x the tokens: the growth is activation-sized ([T, D] buffers), nowhere near the
    # (4096 - 1024) x V x 4 bytes a materialised f32 logits array would add.
    assert t4 - t1 < 0.02 * (4096 - 1024) * v * 4, (t1, t4)
    assert t4 < 0.5 * 4096 * v * 4, t4
    c128, c512 = _temp_bytes(4096, 128), _temp_bytes(4096, 512)
    # 4x the chunk: temporaries follow chunk x V.
    assert c512 > 2.5 * c128, (c128, c512)
    assert c512 - c128 > (512 - 128) * v * 4, (c128, c512)


def test_bf16_w_gradient_accumulates_in_f32_over_chunks():
    """Many chunks must not cost gradient precision: W's gradient is summed over chunks in
    f32, so its error vs an f32 reference matches the unchunked bf16 computation's."""
    rng = np.random.default_rng(1)
    t, d, v = 2048, 16, 512
    h = jnp.asarray(rng.normal(size=(1, t, d)), jnp.bfloat16)
    hl = jnp.asarray(rng.normal(size=(1, t, d)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
    tgt = jnp.asarray(rng.integers(0, v, (1, t)), jnp.int32)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def grad_w(w, chunk, cdt):
        def f(w):
            out = token_terms(h, w, tgt, chunk_size=chunk, h_lens_NTD=hl, compute_dtype=cdt)
            return jnp.sum(out["logp"]) + jnp.sum(out["js"])
        return jax.grad(f)(w)

    ref = np.asarray(grad_w(w, None, jnp.float32), np.float64)
    err = lambda g: np.linalg.norm(np.asarray(g, np.float64) - ref) / np.linalg.norm(ref)  # noqa: E731
    e_unchunked, e_chunked = err(grad_w(w, None, jnp.bfloat16)), err(grad_w(w, 32, jnp.bfloat16))
    assert grad_w(w, 32, jnp.bfloat16).dtype == jnp.float32
    assert e_chunked < 1.3 * e_unchunked, (e_unchunked, e_chunked)
