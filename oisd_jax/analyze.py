"""The paper's pictures of a run: `python -m oisd_jax.analyze --workdir=RUN --out=DIR`.

(a) logit_lens.png: the logit lens (final norm + unembedding) of every layer over the
    positions of one rollout: top next-token per layer and position, coloured by its
    probability, outlined where it agrees with the final layer's top token.
(b) attention_agreement.png: agreement between layer l's attention and the last layer's,
    1 - JS(a_l,h(t,.), a_L,h(t,.)) / log 2 per head h, averaged over response positions t
    with their full causal key sets; one column per checkpoint when a run kept several,
    next to the lens agreement 1 - JS(lens_l, output) / log 2 over the same checkpoints.
(c) curves.png: training curves from metrics.jsonl (reward, response length, entropy of
    the layer-l lens, think/attention JS, held-out accuracy), runs overlaid, seeds of a
    group as mean +- std.

The rollouts analysed are the run's first eval-set prompts (or --prompt) completed
greedily by the newest checkpoint, then held fixed across checkpoints so the columns of
(b) differ only in the weights. Numbers behind the pictures go to analysis.json.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from oisd_jax import metrics as M
from oisd_jax.model import ModelConfig, Params, Taps, final_norm, forward, logits
from oisd_jax.rl import losses

log = logging.getLogger("oisd_jax.analyze")
LOG2 = math.log(2.0)
DEFAULT_CURVES = ("reward", "response_len", "lens_entropy", "think_js", "attn_js", "entropy")


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------- (a) logit lens
@functools.partial(jax.jit, static_argnums=(1, 2))
def _lens_top(params: Params, cfg: ModelConfig, layers: tuple[int, ...], tokens_BT: jax.Array):
    out = forward(params, cfg, tokens_BT, taps=Taps(residual_layers=layers))
    hs = [final_norm(params, cfg, out.residuals[i]) for i in layers] + [out.hidden]

    def top(h):  # one [B, T, V] at a time, only argmax and its probability leave the jit
        p = jax.nn.softmax(logits(params, cfg, h), axis=-1)
        return jnp.argmax(p, -1), jnp.max(p, -1)
    ids, probs = zip(*map(top, hs))
    return jnp.stack(ids, 1), jnp.stack(probs, 1)  # [B, layers + 1, T]


def logit_lens_top(params: Params, cfg: ModelConfig, tokens_T: np.ndarray,
                   layers: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Top-1 next token of each layer's logit lens at every position of one sequence.

    Returns layers [n] (the last entry is num_layers: the model's output), top_ids and
    top_prob [n, T], agree [n, T] (top token equals the final layer's).
    """
    L = cfg.num_layers
    layers = tuple(range(0, L)) if layers is None else tuple(int(i) for i in layers if i < L)
    ids, probs = _lens_top(params, cfg, layers, jnp.asarray(tokens_T, jnp.int32)[None])
    ids, probs = np.asarray(ids[0]), np.asarray(probs[0])
    return {"layers": np.array([*layers, L]), "top_ids": ids, "top_prob": probs, "agree": ids == ids[-1:]}


def _tok_str(tokenizer, i: int) -> str:
    s = tokenizer.convert_ids_to_tokens(int(i))
    s = str(s) if s is not None else f"<{i}>"
    return s.replace("\n", "\\n").replace("Ġ", "␣").replace("▁", "␣").replace(" ", "␣")[:7]


def plot_logit_lens(lens: Mapping[str, np.ndarray], tokens_T: np.ndarray, tokenizer, out_png: str, *,
                    tap_layer: int | None = None, prompt_len: int = 0, max_positions: int = 40) -> str:
    """Grid of layers x positions: the lens's top next-token, colour = its probability,
    white outline = agrees with the final layer. Shows the last `max_positions` positions."""
    plt = _plt()
    T = len(tokens_T)
    lo = max(0, T - max_positions)
    layers, ids, probs, agree = lens["layers"], lens["top_ids"][:, lo:], lens["top_prob"][:, lo:], lens["agree"][:, lo:]
    n, W = ids.shape
    with plt.rc_context({"text.parse_math": False}):  # tokens like "$" or "\boxed{" are not LaTeX
        fig, ax = plt.subplots(figsize=(max(6.0, 0.62 * W + 2.5), max(3.0, 0.36 * n + 1.8)))
        im = ax.imshow(probs, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1)
        for r in range(n):
            for c in range(W):
                ax.text(c, r, _tok_str(tokenizer, ids[r, c]), ha="center", va="center", fontsize=6.5,
                        color="black" if probs[r, c] > 0.6 else "white")
                if agree[r, c] and r < n - 1:
                    ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="white", lw=1.4))
        ax.set_xticks(range(W), [_tok_str(tokenizer, t) for t in tokens_T[lo:]], rotation=90, fontsize=7)
        ax.set_yticks(range(n), [f"{l}" if l < layers[-1] else f"{l} (out)" for l in layers], fontsize=7)
        # positions predicting response tokens (the last one predicts past the end)
        frac = agree[:, max(0, prompt_len - lo - 1):max(W - 1, 1)].mean(1)
        for r in range(n):
            ax.text(W - 0.3, r, f" {100 * frac[r]:.0f}%", ha="left", va="center", fontsize=7, clip_on=False)
        if tap_layer is not None and tap_layer in set(layers.tolist()):
            r = int(np.where(layers == tap_layer)[0][0])
            ax.axhline(r - 0.5, color="red", lw=1.2)
            ax.axhline(r + 0.5, color="red", lw=1.2)
        if lo < prompt_len <= T:
            ax.axvline(prompt_len - lo - 0.5, color="orange", lw=1.2, ls="--")
        ax.set_xlabel("input token at the position (dashed: response starts; cells predict the next token)")
        ax.set_ylabel("layer (residual after block)")
        ax.set_title("logit lens: top next token per layer; outlined = agrees with the final layer; "
                     "right: agreement over the response", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.06, label="top-1 probability")
        fig.tight_layout()
        _save(fig, out_png)
    return out_png


# ----------------------------------------------------------------------------- (b) attention
@functools.partial(jax.jit, static_argnums=(1, 2))
def _attn_js(params: Params, cfg: ModelConfig, layer: int, tokens_BT, segment_ids_BT, queries_BQ):
    B, T = tokens_BT.shape
    L = cfg.num_layers
    keys = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, queries_BQ.shape[1], T))
    taps = Taps(attn_layers=(layer, L), attn_queries=queries_BQ, attn_keys=keys)
    out = forward(params, cfg, tokens_BT, segment_ids=segment_ids_BT, taps=taps)
    return losses.js_divergence(out.attn_logits[layer], out.attn_logits[L])  # [B, Q, H]


def attention_agreement(params: Params, cfg: ModelConfig, sequences: Sequence[np.ndarray],
                        prompt_lens: Sequence[int], layer: int, max_queries: int = 64) -> np.ndarray:
    """[H] mean over sequences and query positions of 1 - JS(a_layer,h, a_L,h) / log 2.

    Queries are the response positions (all positions >= 1 without a response), at most
    `max_queries` evenly spaced per sequence; keys are every position up to the query.
    """
    if not 1 <= layer < cfg.num_layers:
        raise ValueError(f"layer must be in 1..{cfg.num_layers - 1}, got {layer}")
    T = max(len(s) for s in sequences)
    B = len(sequences)
    tokens = np.zeros((B, T), np.int32)
    seg = np.zeros((B, T), np.int32)
    q = np.zeros((B, max_queries), np.int32)
    qv = np.zeros((B, max_queries), bool)
    for b, (s, p) in enumerate(zip(sequences, prompt_lens)):
        tokens[b, :len(s)], seg[b, :len(s)] = s, 1
        first = p if p < len(s) else 1
        pos = np.unique(np.linspace(first, len(s) - 1, max_queries).round().astype(np.int32))
        q[b, :len(pos)], qv[b, :len(pos)] = pos, True
    js = np.asarray(_attn_js(params, cfg, int(layer), jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(q)))
    return 1.0 - (js * qv[..., None]).sum((0, 1)) / qv.sum() / LOG2


@functools.partial(jax.jit, static_argnums=(1, 2))
def _lens_js(params: Params, cfg: ModelConfig, layer: int, tokens_BT, segment_ids_BT):
    out = forward(params, cfg, tokens_BT, segment_ids=segment_ids_BT, taps=Taps(residual_layers=(layer,)))
    student = logits(params, cfg, final_norm(params, cfg, out.residuals[layer]))
    return losses.js_divergence(student, logits(params, cfg, out.hidden))  # [B, T]


def lens_agreement(params: Params, cfg: ModelConfig, sequences: Sequence[np.ndarray], prompt_lens: Sequence[int],
                   layer: int) -> float:
    """1 - JS(lens_layer, final) / log 2 (OISD's think term, full vocabulary, tau = 1), mean
    over the positions that predict response tokens."""
    T, B = max(len(s) for s in sequences), len(sequences)
    tokens, seg, mask = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32), np.zeros((B, T), bool)
    for b, (s, p) in enumerate(zip(sequences, prompt_lens)):
        tokens[b, :len(s)], seg[b, :len(s)] = s, 1
        mask[b, max(p - 1, 0):len(s) - 1] = True  # position t predicts token t + 1
    js = np.asarray(_lens_js(params, cfg, int(layer), jnp.asarray(tokens), jnp.asarray(seg)))
    return float(1.0 - js[mask].mean() / LOG2)


def plot_attention_agreement(steps: Sequence[int], agreement_SH: np.ndarray, out_png: str, *,
                             layer: int, num_layers: int, lens_S: Sequence[float] | None = None) -> str:
    """Per-head agreement of layer `layer` with the last layer, one column per checkpoint;
    right: its mean over training, and the lens agreement (`lens_S`) when given."""
    plt = _plt()
    a = np.asarray(agreement_SH, np.float64)
    S, H = a.shape
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1.4, 1]})
    if S == 1:
        ax0.bar(range(H), a[0], color="tab:blue")
        ax0.axhline(a[0].mean(), color="k", ls="--", lw=1, label=f"mean {a[0].mean():.3f}")
        ax0.set_xlabel("head")
        ax0.set_ylabel("1 - JS / log 2")
        ax0.set_ylim(0, 1)
        ax0.legend(fontsize=8)
    else:
        im = ax0.imshow(a.T, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1)
        ax0.set_xticks(range(S), [str(s) for s in steps], fontsize=7, rotation=90 if S > 12 else 0)
        ax0.set_xlabel("checkpoint step")
        ax0.set_ylabel("head")
        ax0.set_yticks(range(H))
        fig.colorbar(im, ax=ax0, label="1 - JS / log 2")
    ax0.set_title(f"attention agreement, layer {layer} vs layer {num_layers}", fontsize=10)
    ax1.plot(steps, a.mean(1), "o-", label="attention, mean over heads")
    ax1.fill_between(steps, a.min(1), a.max(1), alpha=0.25, label="attention, min..max head")
    if lens_S is not None:
        ax1.plot(steps, lens_S, "s-", color="tab:green", label=f"logit lens {layer} vs output")
    ax1.set_ylabel("1 - JS / log 2")
    ax1.set_xlabel("checkpoint step")
    ax1.set_ylim(0, 1)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_title(f"layer {layer} vs layer {num_layers} over training", fontsize=10)
    fig.tight_layout()
    _save(fig, out_png)
    return out_png


# ----------------------------------------------------------------------------- (c) curves
def default_curve_keys(records: Sequence[Mapping]) -> list[str]:
    present = {k for r in records for k, v in r.items() if isinstance(v, (int, float))}
    evals = sorted(k for k in present if k.startswith("eval/") and ("/avg@" in k or k.endswith("/greedy")))
    return [k for k in DEFAULT_CURVES if k in present] + evals


def curve_stats(paths: Sequence[str], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, std) of a metric over runs, at the steps every run logged (finite values)."""
    series = []
    for p in paths:
        series.append({int(r["step"]): float(r[key]) for r in M.read_jsonl(p)
                       if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])})
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    vals = np.array([[s[t] for t in common] for s in series], np.float64).reshape(len(series), len(common))
    return np.array(common), vals.mean(0), vals.std(0)


def plot_runs(groups: Mapping[str, Sequence[str]], out_png: str, keys: Sequence[str] | None = None, *,
              smooth: int = 1, band: bool = True) -> list[str]:
    """One panel per metric; one line per group (label -> metrics.jsonl paths of its seeds),
    mean (+- std over the group's runs when `band`); `smooth` = trailing moving-average window.
    A group keeps its colour in every panel, also where other groups did not log the metric."""
    plt = _plt()
    colors = {label: f"C{i % 10}" for i, label in enumerate(groups)}
    if keys is None:
        keys = default_curve_keys([r for ps in groups.values() for p in ps for r in M.read_jsonl(p)])
    keys = [k for k in keys if any(curve_stats(ps, k)[0].size for ps in groups.values())]
    if not keys:
        raise ValueError("none of the requested metrics were logged by these runs")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, paths in groups.items():
            steps, mean, std = curve_stats(paths, key)
            if not steps.size:
                continue
            mean, std = _smooth(mean, smooth), _smooth(std, smooth)
            ax.plot(steps, mean, lw=1.3, color=colors[label],
                    label=f"{label} (n={len(paths)})" if len(paths) > 1 else label)
            if band and len(paths) > 1:
                ax.fill_between(steps, mean - std, mean + std, color=colors[label], alpha=0.18)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, out_png)
    return list(keys)


def _smooth(v: np.ndarray, w: int) -> np.ndarray:
    if w <= 1 or v.size == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    i = np.arange(1, v.size + 1)
    lo = np.maximum(i - w, 0)
    return (c[i] - c[lo]) / (i - lo)


def _save(fig, out_png: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out_png)) or ".", exist_ok=True)
    fig.savefig(out_png, dpi=110)
    _plt().close(fig)


# ----------------------------------------------------------------------------- a whole run
def rollouts_for_analysis(run, *, prompts: Sequence[str] | None = None, num_prompts: int = 4,
                          seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """(token sequences prompt + greedy response, prompt lengths) from the run's model."""
    from oisd_jax import data as D
    from oisd_jax import evaluate, rollout
    config = run.config
    if prompts:
        msgs = [[{"role": "user", "content": p}] for p in prompts]
        ids = [D.encode_prompt(run.tokenizer, m, max_prompt_len=int(config.data.max_prompt_len),
                               truncation=config.data.truncation) for m in msgs]
    else:
        name = next(iter(config.data.eval_sets.keys()))
        examples, _ = evaluate.load_benchmarks(config, run.tokenizer, [name], limit=num_prompts)[name]
        ids = [e["prompt_ids"] for e in examples]
    sampler, sampling = evaluate.make_sampler(config, run.model_cfg)
    greedy = dataclasses.replace(sampling, greedy=True, n=1)
    ro = rollout.generate(sampler, sampler.reshard(run.params), run.tokenizer, ids, jax.random.key(seed), greedy,
                          batch_size=len(ids))
    seqs = [np.concatenate([p, r]).astype(np.int32) for p, r in zip(ro.prompt_tokens, ro.tokens)]
    return seqs, [len(p) for p in ro.prompt_tokens]


def analyze(workdirs: Sequence[str], out_dir: str, *, layer: int | None = None, steps: Sequence[int] | None = None,
            prompts: Sequence[str] | None = None, num_prompts: int = 4, what: Sequence[str] = ("lens", "attn", "curves"),
            labels: Sequence[str] | None = None, lens_layers: Sequence[int] | None = None) -> dict[str, str]:
    """Write the pictures of `what` for these runs into out_dir; returns name -> PNG path.

    lens / attn use the first run's checkpoints (`steps`, default every saved one; the
    lens picture uses the newest, over `lens_layers`, default all); curves overlay every run's
    metrics.jsonl.
    """
    from oisd_jax import run_files
    missing = [wd for wd in workdirs if not os.path.isdir(wd)]
    if missing:  # before out_dir (inside the first workdir by default) is created
        raise FileNotFoundError(f"no run folder at {missing[0]}")
    os.makedirs(out_dir, exist_ok=True)
    written, numbers = {}, {}
    if {"lens", "attn"} & set(what):
        wd = workdirs[0]
        saved = run_files.checkpoint_steps(wd)
        if not saved:
            raise FileNotFoundError(f"no checkpoints in {run_files.checkpoint_dir(wd)}")
        steps = sorted(steps) if steps else saved
        run = run_files.load_run(wd, step=steps[-1])
        cfg, L = run.model_cfg, run.model_cfg.num_layers
        layer = int(layer or run.config.rl.tap_layer or L // 2)
        seqs, plens = rollouts_for_analysis(run, prompts=prompts, num_prompts=num_prompts)
        numbers["rollouts"] = [run.tokenizer.decode(s[p:].tolist()) for s, p in zip(seqs, plens)]
        if "lens" in what:
            lens = logit_lens_top(run.params, cfg, seqs[0], layers=lens_layers)
            written["logit_lens"] = plot_logit_lens(lens, seqs[0], run.tokenizer, os.path.join(out_dir, "logit_lens.png"),
                                                    tap_layer=layer, prompt_len=plens[0])
            resp = lens["agree"][:, max(plens[0] - 1, 0):max(len(seqs[0]) - 1, 1)]
            numbers["lens_top1_agreement"] = {int(l): float(a) for l, a in zip(lens["layers"], resp.mean(1))}
        if "attn" in what:
            rows, lens_rows = [], []
            for s in steps:
                params = run.params if s == run.step else run_files.restore_params(wd, cfg, step=s)[1]
                rows.append(attention_agreement(params, cfg, seqs, plens, layer))
                lens_rows.append(lens_agreement(params, cfg, seqs, plens, layer))
            a = np.stack(rows)
            written["attention_agreement"] = plot_attention_agreement(
                steps, a, os.path.join(out_dir, "attention_agreement.png"), layer=layer, num_layers=L,
                lens_S=lens_rows)
            numbers["attention_agreement"] = {"layer": layer, "steps": list(steps), "per_head": a.tolist(),
                                              "lens": lens_rows}
    if "curves" in what:
        labels = labels or [os.path.basename(os.path.normpath(w)) for w in workdirs]
        groups = {lab: [os.path.join(w, M.METRICS_FILE)] for lab, w in zip(labels, workdirs)
                  if os.path.exists(os.path.join(w, M.METRICS_FILE))}
        if groups:
            keys = plot_runs(groups, os.path.join(out_dir, "curves.png"))
            written["curves"] = os.path.join(out_dir, "curves.png")
            numbers["curve_keys"] = keys
    with open(os.path.join(out_dir, "analysis.json"), "w", encoding="utf-8") as f:
        json.dump({"pictures": written, **numbers}, f, indent=2)
    return written


# ----------------------------------------------------------------------------- CLI
FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_list("workdir", None, "Run folder(s); lens/attention use the first, curves overlay all.")
    flags.DEFINE_string("out", None, "Output folder; default <first workdir>/analysis.")
    flags.DEFINE_integer("layer", None, "Layer l; default rl.tap_layer of the run (else L // 2).")
    flags.DEFINE_list("steps", None, "Checkpoint steps for the attention picture; default all saved.")
    flags.DEFINE_multi_string("prompt", None, "Prompt text(s) instead of the run's eval-set prompts.")
    flags.DEFINE_integer("num_prompts", 4, "Eval-set prompts to analyse.")
    flags.DEFINE_list("what", ["lens", "attn", "curves"], "Pictures: lens, attn, curves.")
    flags.DEFINE_list("lens_layers", None, "Layers in the logit-lens picture (the output is always added); default all.")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every handler at INFO
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    out = FLAGS.out or os.path.join(FLAGS.workdir[0], "analysis")
    written = analyze(FLAGS.workdir, out, layer=FLAGS.layer, steps=[int(s) for s in FLAGS.steps or []] or None,
                      prompts=FLAGS.prompt, num_prompts=FLAGS.num_prompts, what=FLAGS.what,
                      lens_layers=[int(x) for x in FLAGS.lens_layers] if FLAGS.lens_layers else None)
    for name, path in written.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    define_flags()
    from oisd_jax import cli
    cli.run_absl(main)
