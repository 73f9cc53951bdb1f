"""End-to-end training: a few steps run, write metrics/checkpoints, and resume exactly."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from oisd_jax.checkpoint import Checkpointer
from oisd_jax.config import ConfigError, validate
from oisd_jax.rl.train_state import abstract_train_state
from oisd_jax.train import train
from oisd_jax.train_setup import build_setup
from tiny_run import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**over):
    """tiny_run's seconds-long config with 4 RL steps, two updates each, checkpoints every 2."""
    return tiny_config(**{"train__steps": 4, "train__mini_batch_prompts": 2, "train__checkpoint_every": 2,
                          "train__sft_warmup_steps": 3, **over})


def _final_params(workdir, config):
    s = build_setup(config)
    with Checkpointer(workdir / "checkpoints", async_save=False) as ck:
        r = ck.restore(abstract_state=abstract_train_state(s.model_cfg, s.step_cfg, s.mesh))
    return r.step, jax.tree.map(np.asarray, r.state.params)


def _run_until_killed(workdir, committed_step: int) -> None:
    """`train(tiny(), workdir)` in a child process, SIGKILLed as soon as it reports that
    `committed_step`'s (synchronous) checkpoint save has returned."""
    code = f"""
import sys
sys.path.insert(0, 'tests')
from test_train import tiny
from oisd_jax import train as T
save = T.Checkpointer.save
def reporting_save(self, step, *a, **k):
    save(self, step, *a, **k)
    print('SAVED', step, flush=True)
T.Checkpointer.save = reporting_save
T.train(tiny(), {str(workdir)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:  # blocks on the child, no timers
            if line.strip() == f"SAVED {committed_step}":
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert (workdir / "checkpoints" / str(committed_step)).is_dir()


def test_few_steps_then_resume_equals_uninterrupted(tmp_path):
    full = tmp_path / "full"
    last = train(tiny(), str(full))
    records = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("reward", "response_len", "loss", "grad_norm", "think_js", "attn_js", "tokens_per_s", "time/sample"):
        assert key in last, key
    assert (full / "reward.png").stat().st_size > 0
    # the step's wall time by phase, each measured with its results waited on: the phases are
    # disjoint parts of the step, so they sum to no more than it
    phases = ("time/sample", "time/reward", "time/pack", "time/old_logp", "time/update")
    for r in records:
        assert all(r[k] > 0 for k in phases), r
        assert r["time/total"] == pytest.approx(sum(r[k] for k in phases))
        assert r["time/total"] <= r["step_time_s"], r
    # a few rollouts per logged step, one per prompt, with their reward and the reference answer
    samples = [json.loads(x) for x in (full / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [1, 2, 3, 4] and {r["name"] for r in samples} == {"rollouts"}
    first = samples[0]["texts"]
    assert len(first) == 4 and all(t.startswith("reward ") and "--- prompt ---" in t and "--- response ---" in t
                                   for t in first)
    assert "what is" in first[0]  # the decoded prompt of the synthetic task
    # SIGKILLed once its step-2 checkpoint is committed (maybe mid-step 3 or mid-save),
    # then rerun with the same workdir.
    part = tmp_path / "part"
    _run_until_killed(part, committed_step=2)
    train(tiny(), str(part))
    step_a, pa = _final_params(full, tiny())
    step_b, pb = _final_params(part, tiny())
    assert step_a == step_b == 4
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), pa, pb))
    assert max(diffs) <= 1e-6
    resumed = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed][-2:] == [3, 4]
    assert resumed[-1]["reward"] == records[-1]["reward"]  # same data order, same rollouts


@pytest.mark.parametrize("algorithm", ["grpo", "bupo"])
def test_baselines_run(tmp_path, algorithm):
    # rl.oisd_metrics: the baselines log OISD's divergences at tap_layer without training on them
    c = tiny(rl__algorithm=algorithm, train__steps=2, rl__bupo_steps=1, train__checkpoint_every=0,
             rl__oisd_metrics=True)
    last = train(c, str(tmp_path))
    assert np.isfinite(last["loss"])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    if algorithm == "bupo":
        assert [r["bupo_phase"] for r in rows] == [1, 0]
        assert "think_js" not in rows[0]  # the internal-policy phase trains the lens itself
    for k in ("think_js", "attn_js", "lens_entropy"):
        assert np.isfinite(rows[-1][k]) and rows[-1][k] > 0, k


def test_bad_config_is_named_before_compiling():
    c = tiny()
    with c.unlocked():
        c.rl.tap_layer = 9
    with pytest.raises(ConfigError, match="rl.tap_layer"):
        validate(c, num_devices=jax.device_count())


@pytest.mark.parametrize("keep,segments", [(True, 3), (False, None)])
def test_sampler_cache_kept_or_freed_before_updates(keep, segments):
    from oisd_jax import metrics
    from oisd_jax.rewards import RewardPool
    from oisd_jax.rl.train_state import init_train_state
    from oisd_jax.train import rl_step
    from oisd_jax.train_setup import train_prompt_iterator
    s = build_setup(tiny(sampler__keep_cache=keep, sampler__decode_segments=segments, train__sft_warmup_steps=0))
    assert s.sampler.decode_segments == (segments or 1)  # tiny's 11 generated slots: 1 by default
    state = init_train_state(s.init_params(jax.random.key(0)), s.step_cfg, s.mesh, s.model_cfg)
    with RewardPool("strict", workers=1) as pool:
        rl_step(s, state, 0, train_prompt_iterator(s), pool, jax.random.key(1), metrics.Timer())
    assert (s.sampler._cache is not None) == keep
    if keep:
        assert s.sampler._cache.segments == segments


def _one_rl_step(s):
    """rl_step once from a fresh init, recording the mini-batches each update and old-log-prob
    pass receives; returns (state, metrics, updated batches, old-log-prob batches)."""
    from oisd_jax import metrics
    from oisd_jax.rewards import RewardPool
    from oisd_jax.rl.train_state import init_train_state
    from oisd_jax.train import rl_step
    from oisd_jax.train_setup import train_prompt_iterator
    updated, logp_seen = [], []
    step_fn, logp_fn = s.step_fns[False], s.logprob_fns[False]
    s.step_fns[False] = lambda st, b: (updated.append(b), step_fn(st, b))[1]
    s.logprob_fns[False] = lambda p, b: (logp_seen.append(b), logp_fn(p, b))[1]
    state = init_train_state(s.init_params(jax.random.key(0)), s.step_cfg, s.mesh, s.model_cfg)
    with RewardPool("strict", workers=1) as pool:
        state, m, _ = rl_step(s, state, 0, train_prompt_iterator(s), pool, jax.random.key(1), metrics.Timer())
    return state, m, updated, logp_seen


def test_ppo_epochs_pass_over_the_minibatches_with_fixed_old_logprobs():
    s = build_setup(tiny(rl__algorithm="grpo", rl__ppo_epochs=3, train__sft_warmup_steps=0, optim__schedule="cosine"))
    state, m, updated, logp_seen = _one_rl_step(s)
    # 4 prompts / 2 per mini-batch = 2 mini-batches, 3 passes: 6 optimizer updates
    assert int(state.step) == m["updates"] == 6
    assert len(logp_seen) == 2  # old log-probs once per mini-batch, before any update ...
    assert [id(b) for b in updated] == [id(b) for b in updated[:2]] * 3  # ... and reused by every pass
    assert s.step_cfg.decay_steps == 4 * 2 * 3  # the cosine decay spans every update of the run
    assert all(b.head_positions is None for b in updated)  # rows of 32: the full head is as short


def test_reinforce_pp_weights_rollouts_by_length(monkeypatch):
    """The trainer gives REINFORCE++ the response lengths: the packed advantages are verl's
    token-level whitening (test_advantages.np_verl_reinforce_pp), not the per-rollout one."""
    from oisd_jax import rollout
    from test_advantages import np_verl_reinforce_pp
    generate, got = rollout.generate, {}

    def varied_lengths(*a, **k):  # a random model rarely stops early: cut rollouts to 1..8 tokens
        ro = generate(*a, **k)
        ro.tokens = [t[:1 + i % len(t)] for i, t in enumerate(ro.tokens)]
        got["lengths"] = ro.lengths
        return ro
    monkeypatch.setattr(rollout, "generate", varied_lengths)
    monkeypatch.setattr(rollout, "score", lambda pool, texts, answers: (np.arange(len(texts)) % 3 == 0).astype(np.float32))
    s = build_setup(tiny(rl__algorithm="reinforce_pp", train__sft_warmup_steps=0))
    _, _, updated, _ = _one_rl_step(s)
    lengths = got["lengths"]
    assert len(set(lengths.tolist())) > 3
    rewards = (np.arange(len(lengths)) % 3 == 0).astype(np.float32)
    want = np_verl_reinforce_pp(rewards, lengths)
    packed = np.concatenate([np.asarray(b.advantages)[np.asarray(b.loss_mask) > 0] for b in updated])
    np.testing.assert_allclose(np.sort(packed), np.sort(np.repeat(want, lengths)), rtol=1e-5, atol=1e-6)
    per_rollout = (rewards - rewards.mean()) / rewards.std(ddof=1)
    assert np.abs(np.sort(np.repeat(per_rollout, lengths)) - np.sort(packed)).max() > 0.1


def test_dr_grpo_selects_its_constant_length_aggregation():
    s = build_setup(tiny(rl__algorithm="dr_grpo"))
    assert (s.step_cfg.loss_agg, s.step_cfg.loss_norm_len) == ("seq-mean-token-sum-norm", 8.0)
    assert build_setup(tiny()).step_cfg.loss_agg == "token-mean"


def test_loss_position_head_on_where_shorter_and_exact():
    """Rows of 128 holding ~30 loss positions: the trainer's batches carry head_positions
    (64 wide) and their loss, metrics, gradients and old log-probs equal the full head's."""
    from oisd_jax.model import init_params
    from oisd_jax.rl.step import compute_grads
    from oisd_jax.rollout import Rollouts
    from oisd_jax.train_setup import make_minibatches
    s = build_setup(tiny(data__max_prompt_len=120))
    rng = np.random.default_rng(0)
    v = s.model_cfg.vocab_size
    prompts = [rng.integers(3, v, rng.integers(10, 21)) for _ in range(4)]
    responses = [rng.integers(3, v, rng.integers(3, 9)) for _ in range(8)]
    ro = Rollouts(prompts, responses, [np.zeros(len(r)) for r in responses], [""] * 8, n=2)
    batches = make_minibatches(s, ro, rng.normal(size=8).astype(np.float32), 0)
    params = init_params(s.model_cfg, jax.random.key(0))
    f = jax.jit(lambda p, b: compute_grads(p, b, s.model_cfg, s.step_cfg))
    for b in batches:
        assert b.head_positions is not None and b.head_positions.shape[-1] == 64
        full = b.replace(head_positions=None)
        (l0, g0, m0), (l1, g1, m1) = f(params, full), f(params, b)
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5, atol=1e-7)
        for k in m0:
            np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-5, atol=1e-6, err_msg=k)
        diff = max(float(np.abs(np.asarray(a) - np.asarray(c)).max()) for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)))
        assert diff <= 1e-5 * max(float(np.abs(np.asarray(c)).max()) for c in jax.tree.leaves(g0))
        lp0, lp1 = (np.asarray(s.logprob_fns[False](params, s.put_batch(x))) for x in (full, b))
        np.testing.assert_allclose(lp1 * b.loss_mask, lp0 * b.loss_mask, atol=1e-6)


def test_kl_coef_refused_before_compiling():
    with pytest.raises(ConfigError, match=r"rl.kl_coef=0.05 needs a reference policy"):
        tiny(rl__kl_coef=0.05)


def test_warmup_targets_are_the_worked_chains_of_the_default():
    """configs/tiny.py (the README's command) warms up on `7-3+5 -> 4+5 -> 9, \\boxed{9}`
    chains; a response budget they do not fit is refused, naming the fields."""
    from oisd_jax.config_files import load_config_file
    from oisd_jax.data import worked_steps
    from oisd_jax.rewards import math_reward
    from oisd_jax.train_setup import sft_batches
    c = load_config_file("configs/tiny.py")
    with c.unlocked():
        c.train.sft_warmup_steps = 1
    s = build_setup(c)
    b = jax.device_get(next(sft_batches(s)))
    mask, tokens, targets = np.asarray(b.loss_mask), np.asarray(b.tokens), np.asarray(b.targets)
    texts = []
    for m, r in zip(*np.nonzero(mask.any(-1))):
        seg = np.asarray(b.segment_ids)[m, r]
        for sid in set(seg[mask[m, r] > 0].tolist()):
            on = (seg == sid) & (mask[m, r] > 0)
            prompt = s.tokenizer.decode(tokens[m, r][(seg == sid) & (mask[m, r] == 0)].tolist())
            texts.append((prompt, s.tokenizer.decode(targets[m, r][on].tolist(), skip_special_tokens=True)))
    assert len(texts) == c.train.sft_batch_size
    for prompt, text in texts:
        expression = prompt.split("what is ")[1].split("?")[0]
        chain = worked_steps(expression)
        assert text == " -> ".join(chain) + ", \\boxed{" + chain[-1] + "}", (prompt, text)
        assert math_reward(text, chain[-1]) == 1.0 and len(chain) == 3  # two operations: two steps
    short = tiny(train__sft_warmup_steps=1)
    with short.unlocked():
        short.data.synthetic.reasoning = True
    with pytest.raises(ValueError, match=r"sampler.max_new_tokens=8 is shorter .*up to 28 tokens .*reasoning=True"):
        next(sft_batches(build_setup(short)))
