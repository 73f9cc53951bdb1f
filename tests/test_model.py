"""Decoder parity with transformers, packing, bf16, HF I/O round trips, sharding."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_fixtures import save_hf_model
from oisd_jax import parallel
from oisd_jax.model import (CheckpointError, ModelConfig, Taps, forward, init_params, load_hf, logit_lens,
                            logits, save_hf)


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def hf_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = save_hf_model(request.param, path, seed=1)
    cfg, params = load_hf(path, dtype=jnp.float32)
    return request.param, path, model, cfg, params


def _hf_run(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens)), output_hidden_states=True, output_attentions=True)


def test_config_from_hf(hf_pair):
    kind, _, model, cfg, _ = hf_pair
    assert cfg.family == kind and cfg.num_layers == model.config.num_hidden_layers
    assert cfg.qk_norm == (kind == "qwen3")
    assert cfg.tie_embeddings == (kind == "qwen3")
    assert (cfg.rope_scaling is not None) == (kind == "llama")


def test_parity_logits_hidden_attention(hf_pair):
    _, _, model, cfg, params = hf_pair
    rng = np.random.default_rng(0)
    B, T, L = 2, 24, cfg.num_layers
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    ref = _hf_run(model, tokens)
    # Probe every (query, key<=query) pair of a few queries: softmax == HF's eager attentions.
    q_idx = np.array([[3, 10, 23], [0, 17, 23]], np.int32)
    k_idx = np.broadcast_to(np.arange(T, dtype=np.int32), (B, 3, T))
    layers = tuple(range(1, L + 1))
    out = jax.jit(lambda p, t: forward(p, cfg, t, taps=Taps(
        residual_layers=tuple(range(L)), attn_layers=layers,
        attn_queries=jnp.asarray(q_idx), attn_keys=jnp.asarray(k_idx))))(params, jnp.asarray(tokens))
    lg = np.asarray(logits(params, cfg, out.hidden))
    assert np.abs(lg - ref.logits.numpy()).max() <= 1e-4
    for i in range(L):
        np.testing.assert_allclose(np.asarray(out.residuals[i]), ref.hidden_states[i].numpy(), atol=1e-5, rtol=0)
    for layer in layers:
        probs = np.asarray(jax.nn.softmax(out.attn_logits[layer], axis=-1))   # [B, Q, H, K]
        hf = ref.attentions[layer - 1].numpy()                                  # [B, H, T, T]
        want = np.stack([hf[b][:, q_idx[b], :].transpose(1, 0, 2) for b in range(B)])
        assert np.abs(probs - want).max() <= 1e-5, layer


def test_logit_lens_matches_hf_norm(hf_pair):
    _, _, model, cfg, params = hf_pair
    tokens = np.arange(12, dtype=np.int32)[None] % cfg.vocab_size
    ref = _hf_run(model, tokens)
    out = forward(params, cfg, jnp.asarray(tokens), taps=Taps(residual_layers=(2,)))
    with torch.no_grad():
        want = model.lm_head(model.model.norm(ref.hidden_states[2])).numpy()
    np.testing.assert_allclose(np.asarray(logit_lens(params, cfg, out.residuals[2])), want, atol=1e-4)
    raw = np.asarray(logit_lens(params, cfg, out.residuals[2], norm=False))
    with torch.no_grad():
        np.testing.assert_allclose(raw, model.lm_head(ref.hidden_states[2]).numpy(), atol=1e-4)


def test_packed_row_equals_separate_forwards(hf_pair):
    _, _, _, cfg, params = hf_pair
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, cfg.vocab_size, 7), rng.integers(0, cfg.vocab_size, 9)
    T = 20  # 7 + 9 + 4 padding
    tok = np.zeros((1, T), np.int32)
    tok[0, :7], tok[0, 7:16], tok[0, 16:] = a, b, rng.integers(0, cfg.vocab_size, 4)
    pos = np.concatenate([np.arange(7), np.arange(9), np.zeros(4)])[None].astype(np.int32)
    seg = np.concatenate([np.full(7, 1), np.full(9, 2), np.zeros(4)])[None].astype(np.int32)
    packed = logits(params, cfg, forward(params, cfg, jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(seg)).hidden)
    la = logits(params, cfg, forward(params, cfg, jnp.asarray(a[None], jnp.int32)).hidden)
    lb = logits(params, cfg, forward(params, cfg, jnp.asarray(b[None], jnp.int32)).hidden)
    np.testing.assert_allclose(packed[0, :7], la[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 7:16], lb[0], atol=1e-5)
    # Right padding (segment 0) leaves the valid positions unchanged.
    padded = np.concatenate([a[None], np.full((1, 5), 3)], 1).astype(np.int32)
    seg_p = np.concatenate([np.ones((1, 7)), np.zeros((1, 5))], 1).astype(np.int32)
    lp = logits(params, cfg, forward(params, cfg, jnp.asarray(padded), segment_ids=jnp.asarray(seg_p)).hidden)
    np.testing.assert_allclose(lp[0, :7], la[0], atol=1e-5)


def test_probe_masks_other_segments_and_unused_keys(hf_pair):
    _, _, _, cfg, params = hf_pair
    tok = jnp.arange(12, dtype=jnp.int32)[None] % cfg.vocab_size
    seg = jnp.asarray([[1] * 6 + [2] * 6], jnp.int32)
    pos = jnp.asarray([list(range(6)) * 2], jnp.int32)
    taps = Taps(attn_layers=(1,), attn_queries=jnp.asarray([[8]]), attn_keys=jnp.asarray([[[2, 6, 8, 9, -1]]]))
    s = np.asarray(forward(params, cfg, tok, pos, seg, taps).attn_logits[1])[0, 0]   # [H, K]
    assert np.isinf(s[:, 0]).all() and np.isinf(s[:, 3]).all() and np.isinf(s[:, 4]).all()  # other seg, future, unused
    assert np.isfinite(s[:, 1:3]).all()


def test_bf16_close_to_f32(hf_pair):
    _, _, _, cfg, params = hf_pair
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
    f32 = logits(params, cfg, forward(params, cfg, tokens).hidden)
    c16 = cfg.replace(dtype="bfloat16")
    b16 = logits(params, c16, forward(params, c16, tokens).hidden)
    # Stated tolerance: bf16 has an 8-bit mantissa; logits of this O(1..10) scale stay within 5e-2 * max|logit|.
    err = float(jnp.abs(b16 - f32).max())
    assert err <= 5e-2 * float(jnp.abs(f32).max()), err
    assert float(jnp.mean(jnp.argmax(b16, -1) == jnp.argmax(f32, -1))) > 0.9


def test_save_hf_roundtrip_transformers(hf_pair, tmp_path):
    kind, _, model, cfg, params = hf_pair
    save_hf(cfg, params, tmp_path / "out", max_shard_bytes=40_000)  # force a sharded checkpoint
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        got = reloaded(torch.tensor(tokens)).logits.numpy()
    want = np.asarray(logits(params, cfg, forward(params, cfg, jnp.asarray(tokens, jnp.int32)).hidden))
    np.testing.assert_allclose(got, want, atol=1e-4)
    cfg2, params2 = load_hf(tmp_path / "out")  # and back through the sharded-index reader
    assert cfg2.replace(eos_token_ids=cfg.eos_token_ids) == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_bf16_checkpoint_loads(hf_pair, tmp_path):
    _, _, _, cfg, params = hf_pair
    save_hf(cfg, params, tmp_path, dtype="bfloat16")
    _, p16 = load_hf(tmp_path, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(p16.embed), np.asarray(params.embed), rtol=1e-2, atol=1e-2)


def test_checkpoint_errors_name_the_tensor(tmp_path):
    save_hf_model("qwen3", tmp_path / "ok")
    from safetensors.numpy import load_file, save_file
    sd = load_file(tmp_path / "ok" / "model.safetensors")
    cfg_json = (tmp_path / "ok" / "config.json").read_text()
    for case, mutate, pattern in [
        ("missing", lambda d: d.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor model.layers.1.mlp.up_proj.weight"),
        ("shape", lambda d: d.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 64), np.float32)}),
         r"model.layers.0.self_attn.k_proj.weight has shape \(8, 64\), expected \(32, 64\)"),
        ("extra", lambda d: d.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}),
         "unexpected tensor model.layers.0.self_attn.q_proj.bias"),
    ]:
        d = dict(sd)
        mutate(d)
        os.makedirs(tmp_path / case)
        save_file(d, tmp_path / case / "model.safetensors")
        (tmp_path / case / "config.json").write_text(cfg_json)
        with pytest.raises(CheckpointError, match=pattern):
            load_hf(tmp_path / case)
    bad = json.loads(cfg_json)
    bad["model_type"] = "gpt2"
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        ModelConfig.from_hf(bad)
    bad = json.loads(cfg_json)
    bad["rope_scaling"] = {"rope_type": "yarn", "factor": 2.0}
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        ModelConfig.from_hf(bad)


def test_sharded_equals_unsharded(hf_pair):
    _, path, _, cfg, params = hf_pair
    mesh = parallel.make_mesh((1, 2, 4))
    cfg_s, params_s = load_hf(path, mesh=mesh)
    assert params_s.layers.w_gate.sharding.spec == parallel.P(None, "fsdp", "tensor")
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (4, 16)), jnp.int32)
    f = jax.jit(lambda p, t: logits(p, cfg, forward(p, cfg, t).hidden))
    with jax.set_mesh(mesh):
        got = f(params_s, jax.device_put(tokens, parallel.sharding_for(("batch", None), mesh)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(f(params, tokens)), atol=1e-5)
    fresh = init_params(cfg, jax.random.key(0), mesh=mesh)
    assert fresh.embed.sharding.spec == parallel.P("tensor", "fsdp")
