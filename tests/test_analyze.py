"""analyze: lens and attention numbers against transformers, plots non-empty, and the whole
CLI path on the shared tiny run."""
import json
import math
import os

import matplotlib.image
import numpy as np
import pytest
import torch

from hf_fixtures import save_hf_model
from oisd_jax import analyze as A
from oisd_jax.data import synthetic_tokenizer
from oisd_jax.model import load_hf


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    model = save_hf_model("qwen3", path, seed=3)
    cfg, params = load_hf(path)
    return model, cfg, params


def _hf_out(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens)[None], dtype=torch.long), output_hidden_states=True,
                     output_attentions=True)


def _png_ok(path):
    assert os.path.getsize(path) > 1000
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # not a blank canvas


def test_logit_lens_matches_transformers(hf, tmp_path):
    model, cfg, params = hf
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 21).astype(np.int32)
    lens = A.logit_lens_top(params, cfg, tokens)
    o = _hf_out(model, tokens)
    with torch.no_grad():
        probs = [torch.softmax(model.lm_head(model.model.norm(o.hidden_states[i]))[0], -1)
                 for i in range(cfg.num_layers)] + [torch.softmax(o.logits[0], -1)]
    ids = np.stack([p.argmax(-1).numpy() for p in probs])
    top = np.stack([p.max(-1).values.numpy() for p in probs])
    assert lens["layers"].tolist() == list(range(cfg.num_layers + 1))
    np.testing.assert_array_equal(lens["top_ids"], ids)
    np.testing.assert_allclose(lens["top_prob"], top, atol=1e-5)
    np.testing.assert_array_equal(lens["agree"], ids == ids[-1])
    # lens agreement: 1 - JS(layer-2 lens, output) / log 2 over the response-predicting positions
    p2, pL = probs[2].numpy().astype(np.float64), probs[-1].numpy().astype(np.float64)
    want = 1 - _js_np(p2, pL)[8:20].mean() / math.log(2)  # prompt 9 tokens: positions 8..19 predict 9..20
    assert A.lens_agreement(params, cfg, [tokens], [9], 2) == pytest.approx(want, abs=1e-5)
    A.plot_logit_lens(lens, tokens, synthetic_tokenizer(), str(tmp_path / "lens.png"), tap_layer=2, prompt_len=9)
    _png_ok(tmp_path / "lens.png")


def _js_np(p, q):
    m = (p + q) / 2
    kl = lambda a, b: np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1) / np.where(b > 0, b, 1)), 0), -1)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_attention_agreement_matches_transformers(hf):
    model, cfg, params = hf
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in (17, 11)]
    plens = [6, 4]
    layer, L = 2, cfg.num_layers
    got = A.attention_agreement(params, cfg, seqs, plens, layer, max_queries=64)  # every response position
    js = []
    for s, p in zip(seqs, plens):
        att = _hf_out(model, s).attentions  # [1, H, T, T] per layer, rows sum to 1 over keys <= query
        a_l, a_L = att[layer - 1][0].numpy(), att[L - 1][0].numpy()
        js += [_js_np(a_l[:, t], a_L[:, t]) for t in range(p, len(s))]  # [H] per query
    want = 1 - np.mean(js, 0) / math.log(2)
    assert got.shape == (cfg.num_heads,)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # a layer agrees with itself perfectly is not testable (l < L), but bounds hold
    assert np.all((got >= 0) & (got <= 1))


def test_attention_and_curve_plots(tmp_path):
    rng = np.random.default_rng(2)
    A.plot_attention_agreement([5], rng.random((1, 4)), str(tmp_path / "a1.png"), layer=2, num_layers=4)
    A.plot_attention_agreement([5, 10, 15], rng.random((3, 4)), str(tmp_path / "a3.png"), layer=2, num_layers=4)
    _png_ok(tmp_path / "a1.png")
    _png_ok(tmp_path / "a3.png")
    # two seeds of one group: mean/std over the steps both logged
    paths = []
    for seed, vals in enumerate(([0.1, 0.3, 0.5], [0.3, 0.5, float("nan"), 0.9])):
        p = tmp_path / f"s{seed}.jsonl"
        p.write_text("".join(json.dumps({"step": i + 1, "reward": v, "think_js": 0.1 * v}) + "\n"
                             for i, v in enumerate(vals)))
        paths.append(str(p))
    steps, mean, std = A.curve_stats(paths, "reward")
    assert steps.tolist() == [1, 2]  # step 3 of seed 1 is NaN, step 4 only in seed 1
    np.testing.assert_allclose(mean, [0.2, 0.4])
    np.testing.assert_allclose(std, [0.1, 0.1])
    keys = A.plot_runs({"oisd": paths, "grpo": paths[:1]}, str(tmp_path / "c.png"))
    assert keys == ["reward", "think_js"]
    _png_ok(tmp_path / "c.png")


def test_analyze_tiny_run(tmp_path_factory, tmp_path):
    from oisd_jax import run_files
    from tiny_run import tiny_run
    run_dir = tiny_run(tmp_path_factory)
    written = A.analyze([run_dir], str(tmp_path), num_prompts=2)
    assert set(written) == {"logit_lens", "attention_agreement", "curves"}
    for p in written.values():
        _png_ok(p)
    info = json.loads((tmp_path / "analysis.json").read_text())
    att = info["attention_agreement"]
    run = run_files.load_run(run_dir)
    assert att["steps"] == [1, 2] and att["layer"] == run.config.rl.tap_layer
    assert np.asarray(att["per_head"]).shape == (2, run.model_cfg.num_heads)
    assert len(att["lens"]) == 2 and all(0 <= x <= 1 for x in att["lens"])
    assert "reward" in info["curve_keys"] and "think_js" in info["curve_keys"]
    assert set(info["lens_top1_agreement"]) == {str(i) for i in range(run.model_cfg.num_layers + 1)}
    assert info["lens_top1_agreement"][str(run.model_cfg.num_layers)] == 1.0
    # a subset of layers (a 30-layer model's picture would be 31 rows): those, plus the output
    A.analyze([run_dir], str(tmp_path / "sub"), num_prompts=2, what=("lens",), lens_layers=[0, 2])
    sub = json.loads((tmp_path / "sub" / "analysis.json").read_text())["lens_top1_agreement"]
    assert sub == {k: info["lens_top1_agreement"][k] for k in ("0", "2", str(run.model_cfg.num_layers))}
    # column 1 is step 1's weights on the same rollouts (re-tokenised from the saved texts
    # would differ; recompute from the greedy rollouts of the newest checkpoint instead)
    seqs, plens = A.rollouts_for_analysis(run, num_prompts=2)
    _, p1 = run_files.restore_params(run_dir, run.model_cfg, step=1)
    np.testing.assert_allclose(A.attention_agreement(p1, run.model_cfg, seqs, plens, att["layer"]),
                               att["per_head"][0], atol=1e-6)
