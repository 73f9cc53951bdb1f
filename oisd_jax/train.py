"""GRPO / OISD / BuPO training: `python -m oisd_jax.train --config=configs/tiny.py --workdir=runs/tiny`.

One RL step, as data flows (docs/design.md): prompts -> Sampler -> reward -> advantages ->
TrainBatch -> old log-probs -> mini-batch updates -> metrics -> checkpoint. Everything
jitted is pure; files, logs, rewards and checkpoints live here in the outer loop.
A rerun with the same --workdir resumes from the newest readable checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from oisd_jax import distributed, evaluate, metrics, rollout, startup
from oisd_jax.checkpoint import Checkpointer, check_writable
from oisd_jax.divergence import SkipGuard
from oisd_jax.resume_check import check_resume
from oisd_jax.rewards import RewardPool
from oisd_jax.rl import advantages
from oisd_jax.rl.batch import mark_on_policy, on_policy_updates
from oisd_jax.rl.step import StepConfig, make_logprob_fn, make_train_step
from oisd_jax.rl.train_state import abstract_train_state, init_train_state
from oisd_jax.run_spec import RunSpec, resolve
from oisd_jax.train_setup import (Setup, build_setup, make_minibatches, sft_batches,
                                  train_prompt_iterator)
from oisd_jax.workdir_lock import WorkdirLock

log = logging.getLogger("oisd_jax.train")


# ----------------------------------------------------------------------------- evaluation
def run_eval(s: Setup, params, step: int, pool: RewardPool, key: jax.Array) -> dict[str, float]:
    """Avg@k / Pass@k (sampled, the paper's protocol) and greedy accuracy per eval set."""
    out = {}
    sampler_params = s.sampler.reshard(params, s.model_cfg.dtype)
    for name, (examples, k) in s.eval_sets.items():
        rewards, _ = evaluate.score_examples(s.sampler, sampler_params, s.tokenizer, examples, k=k,
                                             sampling=s.sampling, key=jax.random.fold_in(key, zlib.crc32(name.encode()) % 2**31),
                                             batch_size=s.spec.sampler.batch_size, reward_pool=pool)
        out.update({f"eval/{name}/{m}": v for m, v in evaluate.summarize(rewards).items()})
        greedy = dataclasses.replace(s.sampling, greedy=True, n=1)
        g, _ = evaluate.score_examples(s.sampler, sampler_params, s.tokenizer, examples, k=1, sampling=greedy,
                                       key=key, batch_size=s.spec.sampler.batch_size, reward_pool=pool)
        out[f"eval/{name}/greedy"] = float(g.mean())
    log.info("eval at step %d: %s", step, {k: round(v, 4) for k, v in out.items()})
    return out


# ----------------------------------------------------------------------------- warm-up
def supervised_warmup(s: Setup, state, workdir: str):
    """A short supervised warm-up on reference responses (the synthetic task only).

    It is the policy-gradient step with advantage 1 and old log-probs equal to the
    current ones: ratio 1, no clipping, gradient = -grad log p (token-mean NLL).
    """
    t = s.spec.train
    sft_cfg = StepConfig(temperature=1.0, lr=t.sft_lr, weight_decay=0.0, grad_clip=1.0,
                         logit_chunk=s.step_cfg.logit_chunk, dual_clip=None)
    sft_state = init_train_state(state.params, sft_cfg, s.mesh, s.model_cfg)
    step_fn = make_train_step(s.model_cfg, sft_cfg, s.mesh)
    logp_fn = make_logprob_fn(s.model_cfg, sft_cfg, s.mesh)
    bar = metrics.ProgressBar(t.sft_warmup_steps, process_index=jax.process_index(),
                              fields={"nll": "sft/nll"}, desc="warm-up")
    (fresh,) = on_policy_updates(1, 1)  # one update per batch: pi_old is the policy itself
    for i, batch in enumerate(sft_batches(s)):
        batch = s.put_batch(mark_on_policy(batch, fresh))
        show = i % 20 == 0 or i == t.sft_warmup_steps - 1
        if show or not fresh:  # the log-prob pass only on the steps that show the NLL
            logp = logp_fn(sft_state.params, batch)
            batch = batch if fresh else batch.replace(old_logp=logp)
        if show:
            nll = -float(jnp.sum(logp) / jnp.maximum(jnp.sum(batch.loss_mask), 1))
            bar.update(i + 1, {"sft/nll": nll})
        sft_state, m = step_fn(sft_state, batch)
    bar.close()
    return init_train_state(sft_state.params, s.step_cfg, s.mesh, s.model_cfg)


# ----------------------------------------------------------------------------- RL step
def rl_step(s: Setup, state, step: int, it, pool: RewardPool, key: jax.Array, timer: metrics.Timer):
    """One RL step; returns (state, metrics, a few rollouts as text for the logs)."""
    spec, algo = s.spec, s.algo
    bupo_now = algo.bupo_active(step)
    step_fn, logp_fn = s.step_fns[bupo_now], s.logprob_fns[bupo_now]
    with timer("sample"):
        examples = s.next_prompts(it)
        ro = rollout.generate(s.sampler, s.sampler.reshard(state.params, s.model_cfg.dtype), s.tokenizer,
                              [e["prompt_ids"] for e in examples], key, s.sampling, spec.sampler.batch_size)
        if not spec.sampler.keep_cache:
            s.sampler.release_cache()  # the updates get the cache's memory
    with timer("reward"):  # scoring and the advantages (host-side: np.asarray waits for them)
        answers = [e["answer"] for e in examples for _ in range(ro.n)]
        rewards = rollout.score(pool, ro.texts, answers).reshape(len(examples), ro.n)
        adv = advantages.compute(algo.adv_estimator, jnp.asarray(rewards),
                                 lengths_BG=jnp.asarray(ro.lengths.reshape(rewards.shape), jnp.float32))
        think_w = None  # signed: the step clips the advantage itself
        if algo.think_weight_mode != "signed" and (algo.use_think or algo.use_attn):
            think_w = np.asarray(advantages.oisd_weights(adv, algo.think_weight_mode,
                                                         s.spec.step.adv_clip)).reshape(-1)
        adv = np.asarray(adv).reshape(-1)
    with timer("pack"):  # packing rollouts into TrainBatch rows and the host-to-device copies
        teacher = [e["teacher_ids"] for e in examples] if algo.use_opsd else None
        steer_r = np.asarray(rewards).reshape(-1) if s.step_cfg.steer_on else None  # OGLS-SD's pools
        minis = make_minibatches(s, ro, adv, step, teacher, think_w, steer_r)
        fresh = on_policy_updates(spec.train.ppo_epochs, len(minis))
        batches = jax.block_until_ready([s.put_batch(mark_on_policy(b, f)) for b, f in zip(minis, fresh)])
    with timer("old_logp"):
        # old log-probs of the other mini-batches come from the policy before this step's
        # updates, and stay fixed over the rl.ppo_epochs passes (PPO's pi_old). One wait per
        # step, at the phase boundary, so the time is this phase's (the updates need them).
        batches = [b if f else b.replace(old_logp=logp_fn(state.params, b)) for b, f in zip(batches, fresh)]
        if s.step_cfg.kl_coef:  # the KL's reference: the frozen initial weights in the state
            batches = [b.replace(ref_logp=logp_fn(state.ref_params, b)) for b in batches]
        batches = jax.block_until_ready(batches)
    with timer("update"):
        step_metrics = []
        for _ in range(spec.train.ppo_epochs):
            for b in batches:
                state, m = step_fn(state, b)
                step_metrics.append(m)
        step_metrics = jax.device_get(step_metrics)
    tokens = int(sum(m["tokens"] for m in step_metrics))
    out = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0] if k != "tokens"}
    if algo.use_opsd:  # teacher prompts cut to data.teacher_max_prompt_len (as data.truncation says)
        out["teacher_prompts_truncated"] = sum(e.get("teacher_cut", 0) > 0 for e in examples)
    out.update(reward=float(rewards.mean()), response_len=float(ro.lengths.mean()),
               truncated=float(ro.truncated(s.sampling.eos_ids).mean()), tokens=tokens,
               bupo_phase=int(bupo_now), reward_timeouts=pool.num_timeouts, updates=len(step_metrics),
               reward_nonfinite=pool.num_nonfinite,
               solve_none=float((rewards.max(1) == 0).mean()), solve_all=float((rewards.min(1) == 1).mean()))
    shown = range(0, len(ro.texts), max(1, ro.n))[:spec.train.log_samples]  # one per prompt
    samples = [f"reward {rewards.flat[i]:g} | answer {answers[i]}\n--- prompt ---\n"
               f"{s.tokenizer.decode(ro.prompt_tokens[i // ro.n].tolist())}\n--- response ---\n{ro.texts[i]}"
               for i in shown]
    return state, out, samples


# ----------------------------------------------------------------------------- main loop
def train(config, workdir: str, spec: RunSpec | None = None) -> dict[str, float]:
    """Run (or resume) training in `workdir`; returns the last metrics written.
    spec: `config`'s RunSpec when the caller resolved it (else resolved here)."""
    workdir = os.path.abspath(workdir)  # orbax refuses relative checkpoint paths
    # before anything compiles: an unwritable folder would lose every step; one owner per folder
    check_writable(os.path.join(workdir, "checkpoints"))
    lock = WorkdirLock(workdir).acquire() if distributed.is_main() else None
    s = build_setup(config, spec)
    t = s.spec.train
    writer = metrics.MetricsWriter(workdir, process_index=jax.process_index())
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=t.keep_checkpoints,
                        async_save=t.async_checkpoint)
    rng = jax.random.key(t.seed)
    it = train_prompt_iterator(s)
    start = 0
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(abstract_state=abstract_train_state(s.model_cfg, s.step_cfg, s.mesh))
        check_resume(restored.config, config, workdir)  # another model / algorithm / data: refused
        state, start = restored.state, int(restored.step)
        it.set_state(restored.data_state)
        log.info("resumed from %s at step %d", ckpt.directory, start)
    else:
        state = init_train_state(s.init_params(jax.random.fold_in(rng, 2**31 - 1)), s.step_cfg, s.mesh, s.model_cfg)
        if t.sft_warmup_steps > 0:
            state = supervised_warmup(s, state, workdir)
    last: dict[str, float] = {}
    flops_per_token = s.train_flops_per_token()
    every = s.spec.eval.every
    with RewardPool(t.reward, workers=t.reward_workers, timeout_s=t.reward_timeout_s) as pool:
        if start == 0 and every:
            last = writer.write(0, run_eval(s, state.params, 0, pool, jax.random.fold_in(rng, 10**9)))
        bar = metrics.ProgressBar(t.steps, initial=start, process_index=jax.process_index())
        timer = metrics.Timer()
        guard = SkipGuard(t.max_skipped_updates, int(state.step), int(state.skipped))
        for step in range(start, t.steps):
            t0 = time.perf_counter()
            state, m, samples = rl_step(s, state, step, it, pool, jax.random.fold_in(rng, step), timer)
            guard.observe(int(state.step), int(state.skipped), step + 1)  # synced already by rl_step's metrics
            m["prompts_truncated"] = s.prompt_cuts.last  # cut to data.max_prompt_len (warned once)
            dt = time.perf_counter() - t0
            m.update(timer.summary(), step_time_s=dt, tokens_per_s=m["tokens"] / dt)
            if np.isfinite(s.peak_flops):  # accelerators with a known peak (not CPUs)
                m["mfu"] = metrics.mfu(flops_per_token * m["tokens"], dt, s.peak_flops)
            done = step + 1
            if every and (done % every == 0 or done == t.steps):
                t_eval = time.perf_counter()
                m.update(run_eval(s, state.params, done, pool, jax.random.fold_in(rng, 10**9 + done)))
                m["eval_time_s"] = time.perf_counter() - t_eval  # outside step_time_s and time/*
            if done % t.log_every == 0 or done == t.steps:
                last = writer.write(done, m)
                if samples:
                    writer.write_texts(done, "rollouts", samples)
            bar.update(done, m)
            if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.steps:
                ckpt.save(done, state, data_state=it.get_state(), config=config)
        bar.close()
    ckpt.wait_until_finished()
    ckpt.close()
    writer.close()
    log.info("finished: %s", guard.summary())
    if lock is not None:
        lock.release()
    if distributed.is_main() and os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        metrics.plot_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "reward.png"),
                            keys=["reward", "response_len", *sorted(k for k in last if k.startswith("eval/")),
                                  "lens_entropy", "think_js", "attn_js", "entropy"])
    return last


# ----------------------------------------------------------------------------- CLI
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", "runs/default", "Run folder: checkpoints, metrics.jsonl, TensorBoard, plots.")
flags.DEFINE_string("init_from_hf", None, "Start from this Hugging Face folder (overrides train.init_from_hf).")
distributed.define_flags()


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO lines
    distributed.initialize_from_flags()
    log.info("%s", startup.describe_backend())
    config = FLAGS.config
    if FLAGS.init_from_hf:
        with config.unlocked():
            config.train.init_from_hf = FLAGS.init_from_hf
    spec = resolve(config, num_devices=jax.device_count())  # every bad field named before compiling
    train(config, FLAGS.workdir, spec)


if __name__ == "__main__":
    from oisd_jax import cli
    cli.run_absl(main)
