"""The paper's comparison in miniature on the embedded task (configs/tiny.py):

    python bench/ablation.py            # GRPO, OISD (full) with each think-weight mode, OPSD, OGLS-SD,
                                        # BuPO, OISD think-only / attention-only: 5 seeds
    python bench/ablation.py --quick    # 2 algorithms x 1 seed x a few steps: a smoke run

Every algorithm of a seed starts from the same supervised warm-up (done once per seed and
saved as a Hugging Face folder, loaded through `train.init_from_hf`), then trains for the
same number of RL steps with the same prompts per step, rollouts per prompt and optimizer
updates: the same budget. Held-out accuracy (Avg@k on the held-out synthetic problems,
sampled like training, and greedy accuracy) is measured by the trainer's own evaluation
every `--eval_every` steps and at the end. Prints a table of final held-out accuracy (mean
+- std over seeds), writes JSON and a PNG of the curves. Reruns skip finished runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from oisd_jax import analyze, metrics  # noqa: E402
from oisd_jax.config import validate  # noqa: E402
from oisd_jax.config_files import load_config_file  # noqa: E402

# "<algorithm>@<rl.think_weight_mode>" is the algorithm with that OISD weight (docs/method.md §7).
# Ordered by what a partial run should have first (runs go seed by seed, algorithm by algorithm).
ALGORITHMS = ("grpo", "oisd", "oisd@positive", "oisd@group_centered", "opsd", "ogls_sd",
              "bupo", "oisd_think_only", "oisd_attn_only")
LABELS = {"grpo": "GRPO", "bupo": "BuPO", "oisd_think_only": "OISD think-only",
          "oisd_attn_only": "OISD attention-only", "oisd": "OISD (full)", "opsd": "OPSD", "ogls_sd": "OGLS-SD",
          "oisd@positive": "OISD (full), positive w", "oisd@group_centered": "OISD (full), group-centred w"}


def make_config(algorithm: str, seed: int, args, warm_dir: str | None):
    algorithm, _, mode = algorithm.partition("@")
    c = load_config_file(f"configs/tiny.py:{algorithm}")
    with c.unlocked():
        c.rl.think_weight_mode = mode or "signed"
        c.train.seed = seed
        c.data.seed = seed
        c.train.steps = args.steps
        c.train.prompts_per_step = args.prompts_per_step
        c.train.mini_batch_prompts = args.mini_batch_prompts
        c.sampler.n = args.n
        c.train.eval_every = args.eval_every
        c.train.eval_prompts = args.eval_prompts
        c.train.checkpoint_every = args.checkpoint_every  # analyze's attention picture reads them
        c.train.keep_checkpoints = 8
        c.data.synthetic.num_eval = args.eval_prompts  # a larger held-out set than tiny's 64
        c.train.sft_warmup_steps = args.warmup_steps
        c.rl.bupo_steps = args.bupo_steps
        if warm_dir is not None:
            c.train.init_from_hf = warm_dir
            c.train.sft_warmup_steps = 0
    validate(c, num_devices=jax.device_count())
    return c


def warm_start(seed: int, args, root: str) -> str:
    """The supervised warm-up of `seed` (train()'s own init and warm-up), as an HF folder."""
    from oisd_jax.model import save_hf
    from oisd_jax.rl.train_state import init_train_state
    from oisd_jax.train import supervised_warmup
    from oisd_jax.train_setup import build_setup
    # the held-out set is excluded from the warm-up's data: its size is part of the name
    out = os.path.join(root, f"warmup{args.warmup_steps}_heldout{args.eval_prompts}_seed{seed}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    c = make_config("grpo", seed, args, None)
    s = build_setup(c)
    rng = jax.random.key(int(c.train.seed))
    state = init_train_state(s.init_params(jax.random.fold_in(rng, 2**31 - 1)), s.step_cfg, s.mesh, s.model_cfg)
    state = supervised_warmup(s, state, out)
    save_hf(s.model_cfg, state.params, out)
    return out


def finished(workdir: str, steps: int) -> bool:
    path = os.path.join(workdir, metrics.METRICS_FILE)
    return os.path.exists(path) and any(r["step"] == steps for r in metrics.read_jsonl(path))


def final_metrics(workdir: str, steps: int) -> dict:
    rec = {r["step"]: r for r in metrics.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE))}
    first = rec.get(0, {})
    js = [rec[s]["think_js"] for s in sorted(rec) if s > 0 and "think_js" in rec[s]]
    trend = {"think_js_first10": float(np.mean(js[:10])), "think_js_last10": float(np.mean(js[-10:]))} if js else {}
    return {"final": rec[steps], "start": first, **trend}


def summarize(results: dict, algorithms, seeds, eval_key: str) -> tuple[str, dict]:
    """Markdown table: final held-out Avg@k and greedy accuracy, mean +- std over seeds, and
    the change against GRPO paired by seed (same warm start, so seed-to-seed spread cancels)."""
    greedy_key = eval_key.rsplit("/", 1)[0] + "/greedy"
    get = lambda a, key, when="final": np.array(  # noqa: E731
        [results[a][s][when].get(key, np.nan) if s in results.get(a, {}) else np.nan for s in seeds]) * 100
    f = lambda x: f"{np.nanmean(x):.1f} +- {np.nanstd(x, ddof=1):.1f}"  # noqa: E731  (sample std over seeds)
    rows = ["| algorithm | held-out Avg@k (final) | held-out greedy (final) | Avg@k minus GRPO's, same seed "
            "| greedy minus GRPO's, same seed | train reward (last step) | held-out Avg@k (start) "
            "| think_js, first -> last 10 steps | seeds |",
            "|" + "---|" * 9]
    table = {}
    base = "grpo" if "grpo" in results else None
    for a in algorithms:
        if a not in results:
            continue
        avg, gr, rw, st = get(a, eval_key), get(a, greedy_key), get(a, "reward"), get(a, eval_key, "start")
        d_avg = avg - get(base, eval_key) if base else np.full_like(avg, np.nan)
        d_gr = gr - get(base, greedy_key) if base else np.full_like(gr, np.nan)
        js0, js1 = (np.array([results[a][s].get(k, np.nan) for s in seeds if s in results[a]])
                    for k in ("think_js_first10", "think_js_last10"))
        table[a] = {"avg": avg.tolist(), "greedy": gr.tolist(), "reward": rw.tolist(), "start": st.tolist(),
                    "avg_minus_grpo": d_avg.tolist(), "greedy_minus_grpo": d_gr.tolist(),
                    "think_js_first10": js0.tolist(), "think_js_last10": js1.tolist()}
        trend = f"{np.nanmean(js0):.3f} -> {np.nanmean(js1):.3f}" if np.isfinite(js0).any() else "-"
        paired = (lambda x: "-" if a == base else f"{np.nanmean(x):+.1f} +- {np.nanstd(x, ddof=1):.1f}")  # noqa: E731
        rows.append(f"| {LABELS[a]} | {f(avg)} | {f(gr)} | {paired(d_avg)} | {paired(d_gr)} | {f(rw)} | {f(st)} "
                    f"| {trend} | {int(np.sum(~np.isnan(avg)))} |")
    return "\n".join(rows), table


def plot_ablation(groups: dict[str, list[str]], png: str, eval_key: str) -> None:
    """Top: held-out Avg@k and greedy accuracy minus GRPO's on the same seed (the warm start
    differs a lot between seeds, so raw mean +- std bands would only show that); bottom:
    means over seeds of held-out Avg@k, train reward and the OISD JS metrics."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    greedy_key = eval_key.rsplit("/", 1)[0] + "/greedy"
    colors = {label: f"C{i}" for i, label in enumerate(groups)}
    base = groups.get(LABELS["grpo"])
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, key in zip(axes[0, :2], (eval_key, greedy_key)):
        for label, paths in groups.items():
            if base is None or paths is base:
                continue
            diffs, steps = [], None
            for p, b in zip(paths, base):
                s1, m1, _ = analyze.curve_stats([p], key)
                s0, m0, _ = analyze.curve_stats([b], key)
                common = np.intersect1d(s1, s0)
                diffs.append((m1[np.isin(s1, common)] - m0[np.isin(s0, common)]) * 100)
                steps = common
            d = np.array(diffs)
            mean = d.mean(0)
            sd = d.std(0, ddof=1) if len(d) > 1 else np.zeros_like(mean)
            ax.plot(steps, mean, "o-", ms=3, color=colors[label], label=label)
            ax.fill_between(steps, mean - sd, mean + sd, color=colors[label], alpha=0.12)
        ax.axhline(0, color=colors.get(LABELS["grpo"], "k"), lw=1.2, label="GRPO (0)")
        ax.set_title(f"held-out {key.rsplit('/', 1)[-1]} minus GRPO's, same seed\n(points; mean +- std over seeds)",
                     fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    for ax, key in zip([axes[0, 2], *axes[1]], (eval_key, "reward", "think_js", "attn_js")):
        for label, paths in groups.items():
            steps, mean, _ = analyze.curve_stats(paths, key)
            if steps.size:
                w = 1 if key.startswith("eval/") else 5
                scale = 1 if key in ("think_js", "attn_js") else 100  # accuracies in percent
                ax.plot(steps, analyze._smooth(mean, w) * scale, color=colors[label], lw=1.3, label=label)
        unit = "" if key in ("think_js", "attn_js") else " (%)"
        name = f"held-out {key.rsplit('/', 1)[-1]}" if key.startswith("eval/") else key
        ax.set_title(f"{name}{unit}, mean over seeds" + ("" if key.startswith("eval/") else ", 5-step average"),
                     fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 4 steps (grpo + oisd unless --algorithms): "
                    "a smoke run")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prompts_per_step", type=int, default=16)
    ap.add_argument("--mini_batch_prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="rollouts per prompt (G)")
    ap.add_argument("--eval_every", type=int, default=10)
    ap.add_argument("--eval_prompts", type=int, default=128, help="held-out problems (x k=4 samples)")
    ap.add_argument("--checkpoint_every", type=int, default=10)
    # 600 (the bare-answer task's setting) starts RL at 90% held-out Avg@4 on the worked-steps task
    # (seed 0, measured), where 7 of 8 groups are all right and GRPO has almost no signal.
    ap.add_argument("--warmup_steps", type=int, default=300, help="supervised steps before RL (tiny.py: 300)")
    ap.add_argument("--bupo_steps", type=int, default=10)
    ap.add_argument("--root", default="runs/ablation", help="run folders (not committed)")
    ap.add_argument("--out", default="bench/results/ablation", help="JSON + PNG prefix")
    args = ap.parse_args()
    if args.quick:
        if args.algorithms == ",".join(ALGORITHMS):
            args.algorithms = "grpo,oisd"
        args.seeds, args.steps, args.eval_every = "0", 4, 2
        args.warmup_steps, args.eval_prompts, args.bupo_steps, args.checkpoint_every = 60, 16, 2, 2
        args.root, args.out = args.root + "_quick", args.out + "_quick"
    logging.basicConfig(level=logging.WARNING)
    # Runs of one algorithm compile the same programs: keep them across runs and reruns.
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(args.root, "jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from oisd_jax.train import train
    algorithms, seeds = args.algorithms.split(","), [int(s) for s in args.seeds.split(",")]
    args.root = os.path.abspath(args.root)  # orbax wants absolute checkpoint paths
    os.makedirs(args.root, exist_ok=True)
    results: dict = {}
    timings = {}
    for seed in seeds:
        t0 = time.perf_counter()
        warm = warm_start(seed, args, args.root)
        timings[f"warmup_seed{seed}"] = time.perf_counter() - t0
        for a in algorithms:
            wd = os.path.join(args.root, f"{a}_seed{seed}")
            if not finished(wd, args.steps):
                t0 = time.perf_counter()
                train(make_config(a, seed, args, warm), wd)
                timings[f"{a}_seed{seed}"] = time.perf_counter() - t0
                print(f"{a} seed {seed}: {timings[f'{a}_seed{seed}']:.0f} s", flush=True)
            results.setdefault(a, {})[seed] = final_metrics(wd, args.steps)
    eval_key = next(k for k in results[algorithms[0]][seeds[0]]["final"] if k.startswith("eval/") and "/avg@" in k)
    md, table = summarize(results, algorithms, seeds, eval_key)
    groups = {LABELS[a]: [os.path.join(args.root, f"{a}_seed{s}", metrics.METRICS_FILE) for s in seeds]
              for a in algorithms}
    png = args.out + ".png"
    plot_ablation(groups, png, eval_key)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"args": vars(args), "eval_key": eval_key, "table": table, "timings_s": timings,
                   "per_run_final": {a: {str(s): r["final"] for s, r in v.items()} for a, v in results.items()}},
                  f, indent=2)
    print(md)
    print(f"curves: {png}\njson: {args.out}.json")


if __name__ == "__main__":
    main()
