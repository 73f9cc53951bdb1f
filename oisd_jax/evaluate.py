"""Avg@k and Pass@k of a policy on math benchmarks (the paper's protocol, docs/method.md).

    python -m oisd_jax.evaluate --config=configs/qwen3_4b.py --workdir=runs/oisd \
        --benchmarks=aime24,aime25,amc23,math500
    python -m oisd_jax.evaluate --config=configs/qwen3_4b.py --hf=/models/Qwen3-4B

k samples per problem (the config's eval_sets[name].k: 32 for AIME, 16 for AMC23 and
MATH500), sampled with the training Sampler at the config's temperature / top_p / response
budget and template, scored with the training reward. Writes `<out>/results.json`, a
per-sample dump `<out>/samples.jsonl` (one line per rollout), and prints a table. A rerun
with the same --out skips problems whose k samples are already in the dump; the sampling
key of each chunk of problems depends only on the seed, the benchmark and the chunk's first
problem, so an interrupted-and-resumed evaluation draws the same samples as an
uninterrupted one.

Public functions: `pass_at_k(n, c, k)` (unbiased estimator), `avg_at_k`, `summarize`, and
`score_examples` (sample k per problem, score with the training reward), which the
trainer's periodic evaluation also uses.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import zlib
from typing import TYPE_CHECKING, Any, Sequence

import jax
import numpy as np
from absl import app, flags

if TYPE_CHECKING:  # the estimators import without the sampler / decoder stack
    from oisd_jax import rollout
    from oisd_jax.sampler import Sampler, SamplingParams

log = logging.getLogger("oisd_jax.evaluate")
RESULTS_FILE, SAMPLES_FILE, META_FILE = "results.json", "samples.jsonl", "eval_meta.json"


# ----------------------------------------------------------------------------- estimators
def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of the n samples include a correct one.

    Computed as a product (no huge binomials): 1 - prod_{i=n-c+1}^{n} (1 - k / i).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def avg_at_k(correct: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Mean accuracy over k samples per problem ([problems, k] of 0/1), averaged over problems."""
    a = np.asarray(correct, np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"avg_at_k wants a non-empty [problems, k] array, got shape {a.shape}")
    return float(a.mean())


def summarize(correct: np.ndarray, ks: Sequence[int] | None = None) -> dict[str, float]:
    """avg@k and pass@k' (k' in ks, up to k) of a [problems, k] 0/1 array."""
    P, k = np.asarray(correct).shape
    ks = ks or sorted({1, 2, 4, 8, 16, 32, k} & set(range(1, k + 1)))
    c = np.asarray(correct).sum(1).astype(int)
    out = {f"avg@{k}": avg_at_k(correct)}
    for kk in ks:
        out[f"pass@{kk}"] = float(np.mean([pass_at_k(k, int(ci), kk) for ci in c]))
    return out


def score_examples(sampler: Sampler, params, tokenizer, examples: Sequence[dict], *, k: int,
                   sampling: SamplingParams, key: jax.Array, batch_size: int, reward_pool,
                   ) -> tuple[np.ndarray, rollout.Rollouts]:
    """k rollouts per example (dicts with prompt_ids and answer): ([P, k] rewards, rollouts)."""
    from oisd_jax import rollout
    sampling = dataclasses.replace(sampling, n=k)
    ro = rollout.generate(sampler, params, tokenizer, [e["prompt_ids"] for e in examples], key, sampling,
                          batch_size)
    answers = [e["answer"] for e in examples for _ in range(k)]
    rewards = rollout.score(reward_pool, ro.texts, answers).reshape(len(examples), k)
    return rewards, ro


# ----------------------------------------------------------------------------- benchmarks
def load_benchmarks(config, tokenizer, names: Sequence[str] | None = None, *, k: int | None = None,
                    limit: int | None = None) -> dict[str, tuple[list[dict], int]]:
    """name -> (examples with prompt_ids / answer / index, k) from `config.data.eval_sets`,
    built exactly as the trainer builds its eval sets (same files, template, truncation and
    held-out synthetic problems). k overrides every set's k; limit keeps the first problems."""
    from oisd_jax import train_setup as TS  # the trainer's own eval-set construction
    from oisd_jax.run_spec import resolve
    spec = resolve(config, num_devices=None, check_paths=False)
    sets = {e.name: e for e in spec.eval.sets}
    names = list(names or sets)
    unknown = [n for n in names if n not in sets]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; config.data.eval_sets has {sorted(sets)}")
    chosen = tuple(dataclasses.replace(sets[n], k=sets[n].k if k is None else int(k)) for n in names)
    held = []
    if any(e.path is None for e in chosen):
        if spec.data.format != "synthetic":
            raise ValueError("an eval set with path None means held-out synthetic problems; "
                             f"data.format is {spec.data.format!r}")
        held = TS.read_records(spec.data)[1]
    return TS.build_eval_sets(spec.data, dataclasses.replace(spec.eval, sets=chosen, prompts=int(limit or 0)),
                              tokenizer, held)


def make_sampler(config, model_cfg) -> "tuple[Sampler, SamplingParams]":
    """The trainer's Sampler and sampling settings for a config (see train_setup.build_setup)."""
    from oisd_jax.run_spec import resolve
    spec = resolve(config, num_devices=None, check_paths=False)
    return _sampler(model_cfg, spec.mesh.decode_shape, spec.sampler)


@functools.lru_cache(maxsize=4)
def _sampler(model_cfg, mesh_shape, sampler_spec):
    # Cached: a Sampler holds its compiled prefill/decode, so repeated evaluations or analyses
    # of one model shape in a process compile once.
    from oisd_jax import parallel
    from oisd_jax.train_setup import make_sampler as build
    return build(sampler_spec, model_cfg, parallel.make_mesh(mesh_shape))


# ----------------------------------------------------------------------------- the dump
def read_dump(path: str | os.PathLike) -> dict[tuple[str, int], dict[int, dict]]:
    """(benchmark, problem index) -> {sample index: record}; later lines win, and a torn
    last line (a crash mid-write) is ignored."""
    out: dict[tuple[str, int], dict[int, dict]] = {}
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.setdefault((r["benchmark"], int(r["index"])), {})[int(r["sample"])] = r
    return out


def _keep_only(path: str, redo: set[tuple[str, int]]) -> None:
    """Rewrite the dump without the lines of problems about to be redone (and without a
    torn last line), so it never holds two versions of a sample."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    keep = []
    for line in lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (r["benchmark"], int(r["index"])) not in redo:
            keep.append(line)
    if len(keep) != len([x for x in lines if x]):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(x + "\n" for x in keep))
        os.replace(tmp, path)


def complete_rewards(dump: dict, name: str, examples: Sequence[dict], k: int) -> dict[int, list[float]]:
    """problem index -> its k rewards, for the problems whose k samples are all in the dump."""
    out = {}
    for e in examples:
        got = dump.get((name, int(e["index"])), {})
        if all(j in got for j in range(k)):
            out[int(e["index"])] = [float(got[j]["reward"]) for j in range(k)]
    return out


def _check_meta(out_dir: str, meta: dict, overwrite: bool) -> None:
    """A dump is resumed only by the same evaluation (model, sampling, seed, each set's k)."""
    path = os.path.join(out_dir, META_FILE)
    if overwrite:
        for fn in (SAMPLES_FILE, RESULTS_FILE):
            if os.path.exists(os.path.join(out_dir, fn)):
                os.remove(os.path.join(out_dir, fn))
    elif os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        clash = {k: (old.get(k), meta.get(k)) for k in set(old) | set(meta)
                 if k != "benchmarks" and old.get(k) != meta.get(k)}
        old_sets = old.get("benchmarks", {})
        clash.update({n: (old_sets[n], v) for n, v in meta["benchmarks"].items() if old_sets.get(n, v) != v})
        if clash:
            raise ValueError(f"{out_dir} holds another evaluation (was, now): {clash}; "
                             "use another --out or --overwrite")
        meta = {**meta, "benchmarks": {**old_sets, **meta["benchmarks"]}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


# ----------------------------------------------------------------------------- the loop
def evaluate(run, benchmarks: dict[str, tuple[list[dict], int]], out_dir: str, *, seed: int = 0,
             reward_pool=None, overwrite: bool = False, progress: bool = True,
             reward: str | None = None) -> dict[str, Any]:
    """Sample, score and dump every benchmark's problems (skipping those already dumped);
    returns (and writes) the results: per benchmark n, k, avg@k, pass@k'; and their mean.
    reward: the scorer (one of choices.REWARDS); default the run's train.reward. It is part
    of the dump's metadata, so one --out never mixes two scorers."""
    from oisd_jax import distributed, metrics
    from oisd_jax.rewards import RewardPool
    from oisd_jax.run_spec import resolve
    # Several processes: all sample (one SPMD program) and share the reward checks; process
    # 0 alone touches the files, and the others read them (a shared folder) after a barrier.
    main = distributed.is_main()
    spec = resolve(run.config, num_devices=None, check_paths=False)
    sampler, sampling = _sampler(run.model_cfg, spec.mesh.decode_shape, spec.sampler)
    kind = reward or spec.train.reward
    meta = {"source": run.source, "seed": int(seed), "reward": kind,
            "sampling": {k: v for k, v in dataclasses.asdict(sampling).items() if k != "n"},
            "max_new_tokens": spec.sampler.max_new_tokens, "max_prompt_len": spec.sampler.max_prompt_len,
            "benchmarks": {n: {"k": k} for n, (ex, k) in benchmarks.items()}}
    meta = json.loads(json.dumps(meta, default=list))  # tuples as lists, as they read back
    if main:
        os.makedirs(out_dir, exist_ok=True)
        _check_meta(out_dir, meta, overwrite)
    distributed.sync("eval_meta")
    dump_path = os.path.join(out_dir, SAMPLES_FILE)
    batch = spec.sampler.batch_size
    # Chunks sit at fixed positions of each benchmark's problem list and a chunk's key
    # depends only on its first problem, so a resumed run redraws exactly the samples an
    # uninterrupted one would. A chunk cut short by a crash is redone whole.
    chunks = [(name, k, ex[i:i + batch]) for name, (ex, k) in benchmarks.items() for i in range(0, len(ex), batch)]
    dump = read_dump(dump_path)
    todo = [c for c in chunks if len(complete_rewards(dump, c[0], c[2], c[1])) < len(c[2])]
    distributed.sync("eval_dump_read")  # before process 0 rewrites it
    if main:
        _keep_only(dump_path, {(name, int(e["index"])) for name, _, ch in todo for e in ch})
    total = sum(len(ex) for ex, _ in benchmarks.values())
    done = total - sum(len(c[2]) for c in todo)
    bar = metrics.ProgressBar(total, initial=done, process_index=0 if progress and main else 1, fields={},
                              desc="eval")
    own_pool = reward_pool is None
    pool = reward_pool or RewardPool(kind, workers=spec.train.reward_workers,
                                     timeout_s=spec.train.reward_timeout_s)
    params = sampler.reshard(run.params) if todo else None
    base = jax.random.key(int(seed))
    try:
        with open(dump_path if main else os.devnull, "a", encoding="utf-8") as f:  # process 0 writes
            for name, k, chunk in todo:
                key = jax.random.fold_in(jax.random.fold_in(base, zlib.crc32(name.encode())), int(chunk[0]["index"]))
                rewards, ro = score_examples(sampler, params, run.tokenizer, chunk, k=k, sampling=sampling,
                                             key=key, batch_size=batch, reward_pool=pool)
                truncated = ro.truncated(sampling.eos_ids)
                lines = [json.dumps({
                    "benchmark": name, "index": int(e["index"]), "sample": j, "answer": str(e["answer"]),
                    "reward": float(rewards[b, j]), "response": ro.texts[b * k + j],
                    "length": int(len(ro.tokens[b * k + j])), "truncated": bool(truncated[b * k + j])})
                    for b, e in enumerate(chunk) for j in range(k)]
                f.write("".join(x + "\n" for x in lines))
                f.flush()  # a chunk is on disk before the next starts: the resume point
                done += len(chunk)
                bar.update(done)
    finally:
        bar.close()
        if own_pool:
            pool.close()
    distributed.sync("eval_dump_written")
    return write_results(out_dir, benchmarks, source=run.source, write=main)


def write_results(out_dir: str, benchmarks: dict[str, tuple[list[dict], int]], *, source: str,
                  write: bool = True) -> dict[str, Any]:
    """results.json from the dump: per benchmark avg@k / pass@k', and the mean over benchmarks
    (computed by every caller; written if `write`)."""
    dump = read_dump(os.path.join(out_dir, SAMPLES_FILE))
    per = {}
    for name, (examples, k) in benchmarks.items():
        done = complete_rewards(dump, name, examples, k)
        if len(done) != len(examples):
            raise RuntimeError(f"{name}: {len(examples) - len(done)} problems lack samples in the dump")
        correct = np.array([done[int(e["index"])] for e in examples], np.float64)
        per[name] = {"problems": len(examples), "k": k, **summarize(correct)}
    mean: dict[str, float] = {"avg": float(np.mean([v[f"avg@{v['k']}"] for v in per.values()]))}
    common = set.intersection(*({m for m in v if m.startswith("pass@")} for v in per.values())) if per else set()
    for m in sorted(common, key=lambda s: int(s[5:])):
        mean[m] = float(np.mean([v[m] for v in per.values()]))
    results = {"source": source, "benchmarks": per, "mean": mean}
    if write:
        tmp = os.path.join(out_dir, RESULTS_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, os.path.join(out_dir, RESULTS_FILE))
    return results


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: one row per benchmark and their mean, in percent."""
    per = results["benchmarks"]
    passes = sorted({m for v in per.values() for m in v if m.startswith("pass@")}, key=lambda s: int(s[5:]))
    head = ["benchmark", "n", "k", "Avg@k", *[m.replace("pass", "Pass") for m in passes]]
    rows = [[name, str(v["problems"]), str(v["k"]), f"{100 * v['avg@' + str(v['k'])]:.2f}",
             *[f"{100 * v[m]:.2f}" if m in v else "-" for m in passes]] for name, v in per.items()]
    mean = results["mean"]
    rows.append(["mean", "", "", f"{100 * mean['avg']:.2f}", *[f"{100 * mean[m]:.2f}" if m in mean else "-"
                                                             for m in passes]])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


# ----------------------------------------------------------------------------- CLI
FLAGS = flags.FLAGS


def define_flags() -> None:
    # Defined only when run as a program (the trainer imports this module).
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]); with --workdir "
                                    "defaults to the config saved in the checkpoint.", lock_config=False)
    flags.DEFINE_string("workdir", None, "Run folder: evaluate its checkpoint (see --step).")
    flags.DEFINE_integer("step", None, "Checkpoint step with --workdir; default the newest.")
    flags.DEFINE_string("hf", None, "A Hugging Face folder to evaluate instead of a run.")
    flags.DEFINE_list("benchmarks", None, "Names in config.data.eval_sets; default all of them.")
    flags.DEFINE_integer("k", None, "Samples per problem for every benchmark (default: each set's k).")
    flags.DEFINE_integer("limit", None, "Evaluate only the first N problems of each benchmark.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_string("out", None, "Output folder; default <workdir>/eval/step_<step> or <hf>/eval.")
    flags.DEFINE_bool("overwrite", False, "Start over even if --out holds another evaluation.")
    from oisd_jax.choices import REWARDS
    flags.DEFINE_enum("reward", None, list(REWARDS), "Scorer (math-verify, strict, or verl's "
                      "math.compute_score); default the run's train.reward.")
    from oisd_jax import distributed
    distributed.define_flags()


def main(argv):
    del argv
    from oisd_jax import distributed, run_files, startup
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every handler at INFO
    distributed.initialize_from_flags()  # every process of a multi-host slice runs this command
    log.info("%s", startup.describe_backend())
    if bool(FLAGS.workdir) == bool(FLAGS.hf):
        raise app.UsageError("give exactly one of --workdir and --hf")
    if FLAGS.hf:
        if FLAGS.config is None:
            raise app.UsageError("--hf needs --config (data, template, sampler settings)")
        run = run_files.load_hf_run(FLAGS.hf, FLAGS.config)
        out = FLAGS.out or os.path.join(FLAGS.hf, "eval")
    else:
        run = run_files.load_run(FLAGS.workdir, step=FLAGS.step, config=FLAGS.config)
        out = FLAGS.out or os.path.join(FLAGS.workdir, "eval", f"step_{run.step}")
    benchmarks = load_benchmarks(run.config, run.tokenizer, FLAGS.benchmarks, k=FLAGS.k, limit=FLAGS.limit)
    results = evaluate(run, benchmarks, out, seed=FLAGS.seed, overwrite=FLAGS.overwrite, reward=FLAGS.reward)
    if distributed.is_main():
        print(f"{run.source}\n{format_table(results)}\nwritten to {out}/{RESULTS_FILE} and {SAMPLES_FILE}")


if __name__ == "__main__":
    define_flags()
    from oisd_jax import cli
    cli.run_absl(main)
