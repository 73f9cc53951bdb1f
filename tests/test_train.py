"""End-to-end training: a few steps run, write metrics/checkpoints, and resume exactly."""
import json
import os
import random
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


# ----------------------------------------------------------------------------- fault injection
PHASES = ("sample", "update", "save")
# The child kills itself with SIGKILL at phase X of RL step N: the hooks are patched in by
# the child's own code below (nothing in oisd_jax reads them, so no normal run can fire one).
#   sample: the sampler has returned this step's rollouts, no reward or update done yet
#   update: after the first of the step's two optimizer updates (params half-updated in memory)
#   save:   every item of the step's checkpoint written to <step>.orbax-checkpoint-tmp-*, not yet
#           renamed into place (orbax's atomic commit), so the step must not count as saved
_KILL_CHILD = """
import os, signal, sys
sys.path.insert(0, 'tests')
import jax
from test_train import tiny
from oisd_jax import train as T
from oisd_jax.sampler import Sampler
from orbax.checkpoint._src.path import atomicity
PHASE, STEP = {phase!r}, {step}
now = {{"step": -1}}
def hit(phase):
    if phase == PHASE and now["step"] == STEP:
        print("KILL", phase, STEP, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
rl_step = T.rl_step
def rl_step_(s, state, step, *a, **k):
    now["step"] = step
    return rl_step(s, state, step, *a, **k)
T.rl_step = rl_step_
generate = Sampler.generate
def generate_(self, *a, **k):
    out = generate(self, *a, **k)
    hit("sample")
    return out
Sampler.generate = generate_
build_setup = T.build_setup
def build_setup_(*a, **k):
    s = build_setup(*a, **k)
    def wrap(fn):
        def step_fn(state, batch):
            out = jax.block_until_ready(fn(state, batch))
            hit("update")
            return out
        return step_fn
    s.step_fns = {{p: wrap(f) for p, f in s.step_fns.items()}}
    return s
T.build_setup = build_setup_
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize_(self, *a, **k):
    hit("save")
    return await finalize(self, *a, **k)
atomicity.AtomicRenameTemporaryPath.finalize = finalize_
T.train(tiny(), {workdir!r})
"""


def kill_points(seed: int, steps: int = 4, every: int = 2) -> list[tuple[str, int]]:
    """One SIGKILL per phase, in a seeded order at seeded RL steps, each reachable from the
    checkpoint the previous kill left (a save happens after steps N with (N+1) % every == 0)."""
    rng = random.Random(seed)
    committed, out = 0, []
    for phase in rng.sample(PHASES, len(PHASES)):
        steps_ok = [n for n in range(committed, steps) if phase != "save" or (n + 1) % every == 0]
        n = rng.choice(steps_ok)
        out.append((phase, n))
        committed = n // every * every  # killed before step n's own save committed
    return out


def _kill_at(workdir, phase: str, step: int) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILL_CHILD.format(phase=phase, step=step, workdir=str(workdir))],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL and f"KILL {phase} {step}" in proc.stdout, \
        (phase, step, proc.returncode, proc.stderr[-2000:])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """tiny() trained once, uninterrupted: (workdir, metrics records, last metrics)."""
    full = tmp_path_factory.mktemp("full")
    last = train(tiny(), str(full))
    return full, [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()], last


def test_few_steps_then_resume_equals_uninterrupted(tmp_path, full_run):
    full, records, last = full_run
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




def _metrics_by_step(workdir) -> dict[int, dict]:
    from oisd_jax.metrics import read_jsonl
    noisy = ("time", "step_time_s", "tokens_per_s", "time/")  # wall-clock figures
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(noisy)} for r in read_jsonl(workdir / "metrics.jsonl")}


def test_sigkill_at_seeded_points_then_resume_equals_uninterrupted(tmp_path, full_run):
    """kill -9 during sampling, during an update and during a checkpoint save (order and steps
    drawn from OISD_FAULT_SEED, default 0), each followed by a rerun on the same workdir: the
    final params equal the uninterrupted run's bit for bit, and so does every logged metric
    except wall-clock times (each step reruns the same compiled programs on the same inputs:
    the data iterator, the PRNG keys and the train state all come from the checkpoint)."""
    seed = int(os.environ.get("OISD_FAULT_SEED", "0"))
    points = kill_points(seed)
    assert sorted(p for p, _ in points) == sorted(PHASES)
    part = tmp_path / "part"
    for phase, step in points:
        _kill_at(part, phase, step)
        if phase == "save":  # killed mid-save: written, not committed, so not a checkpoint
            names = [p.name for p in (part / "checkpoints").iterdir()]
            assert str(step + 1) not in names and any(n.startswith(f"{step + 1}.orbax-checkpoint-tmp")
                                                      for n in names), names
        assert not any(p.name.endswith(".corrupt-1") for p in (part / "checkpoints").iterdir())
    train(tiny(), str(part))
    assert not [p.name for p in (part / "checkpoints").iterdir() if "tmp" in p.name]  # half-saves dropped
    full = full_run[0]
    step_a, pa = _final_params(full, tiny())
    step_b, pb = _final_params(part, tiny())
    assert step_a == step_b == 4
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb))), points
    assert _metrics_by_step(part) == _metrics_by_step(full), points


def test_kill_points_are_seeded_and_reachable():
    assert kill_points(0) == kill_points(0) and len({tuple(kill_points(s)) for s in range(20)}) > 5
    for seed in range(50):
        committed = 0
        for phase, n in kill_points(seed):
            assert committed <= n < 4 and (phase != "save" or (n + 1) % 2 == 0)
            committed = n // 2 * 2


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


def test_first_update_skips_its_old_logprob_pass_and_equals_recomputing_it(tmp_path, full_run, monkeypatch):
    """ppo_epochs = 1: the step's first mini-batch is marked on-policy and gets no old-log-prob
    pass (nor do the warm-up's batches); the run equals one that recomputes every pass
    (`on_policy_updates` patched to mark nothing): the same metrics and parameters."""
    import oisd_jax.train as T
    s = build_setup(tiny(rl__algorithm="grpo", train__sft_warmup_steps=0))
    _, m, updated, logp_seen = _one_rl_step(s)
    assert m["updates"] == 2
    assert [float(np.min(b.on_policy)) for b in updated] == [1.0, 0.0] == [float(np.max(b.on_policy)) for b in updated]
    assert len(logp_seen) == 1 and np.array_equal(np.asarray(logp_seen[0].tokens), np.asarray(updated[1].tokens))
    full, records, _ = full_run  # tiny(): OISD, 3 warm-up steps, 4 RL steps of 2 updates
    monkeypatch.setattr(T, "on_policy_updates", lambda epochs, n: [False] * n)
    recomputed = tmp_path / "recomputed"
    train(tiny(), str(recomputed))
    a, b = _metrics_by_step(full), _metrics_by_step(recomputed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step]["reward"] == b[step]["reward"] and a[step]["response_len"] == b[step]["response_len"]
        for k in ("loss", "pg_loss", "think_js", "attn_js", "grad_norm", "approx_kl", "clip_frac_high"):
            assert a[step][k] == pytest.approx(b[step][k], rel=1e-4, abs=1e-6), (step, k)
    _, pa = _final_params(full, tiny())
    _, pb = _final_params(recomputed, tiny())
    # float noise only: the recomputed pass gives ratios of 1 +- 1e-7, and Adam's m / sqrt(v)
    # carries that through 11 updates (measured: at most 2e-5 of a leaf's norm, 1.7e-4 at one
    # element of wo); the resume test above holds the same programs to 1e-6
    rel = jax.tree.map(lambda x, y: float(np.linalg.norm(x - y) / np.linalg.norm(x)), pa, pb)
    assert max(jax.tree.leaves(rel)) <= 1e-4, rel


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


def _random_rollouts():
    """A setup with rows of 128 and 8 random rollouts (2 per prompt) of 3..8 tokens."""
    from oisd_jax.rollout import Rollouts
    s = build_setup(tiny(data__max_prompt_len=120))
    rng = np.random.default_rng(0)
    v = s.model_cfg.vocab_size
    prompts = [rng.integers(3, v, rng.integers(10, 21)) for _ in range(4)]
    responses = [rng.integers(3, v, rng.integers(3, 9)) for _ in range(8)]
    return s, Rollouts(prompts, responses, [np.zeros(len(r)) for r in responses], [""] * 8, n=2), rng


def test_loss_position_head_on_where_shorter_and_exact():
    """Rows of 128 holding ~30 loss positions: the trainer's batches carry head_positions
    (64 wide) and their loss, metrics, gradients and old log-probs equal the full head's."""
    from oisd_jax.model import init_params
    from oisd_jax.rl.step import compute_grads
    from oisd_jax.train_setup import make_minibatches
    s, ro, rng = _random_rollouts()
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


def test_kl_coef_to_a_moving_reference_refused_before_compiling():
    """rl.kl_coef now runs (the frozen reference in the state: tests/test_train_opsd.py); a KL
    to an EMA or the current weights is refused before anything compiles."""
    tiny(rl__kl_coef=0.05)
    with pytest.raises(ConfigError, match=r"rl.kl_coef=0.05 needs rl.teacher='frozen'"):
        tiny(rl__kl_coef=0.05, rl__teacher="ema")


@pytest.mark.parametrize("mode", ["positive", "group_centered"])
def test_think_weight_mode_reaches_the_packed_batches(monkeypatch, mode):
    """rl.think_weight_mode: with one right answer in each group of 4 the trainer packs
    advantages.oisd_weights (test_advantages.np_oisd_weights) as the think and probe weights,
    while L_pg keeps the plain advantage."""
    from oisd_jax import rollout
    from test_advantages import np_oisd_weights
    got = {}
    generate = rollout.generate

    def spy(*a, **k):
        ro = generate(*a, **k)
        got["lengths"] = ro.lengths
        return ro
    monkeypatch.setattr(rollout, "generate", spy)
    monkeypatch.setattr(rollout, "score", lambda pool, texts, answers: (np.arange(len(texts)) % 4 == 0).astype(np.float32))
    s = build_setup(tiny(rl__think_weight_mode=mode, sampler__n=4, train__sft_warmup_steps=0))
    assert s.spec.algo.think_weight_mode == mode
    _, m, updated, _ = _one_rl_step(s)
    lengths = got["lengths"]
    rewards = (np.arange(len(lengths)) % 4 == 0).astype(np.float64).reshape(-1, 4)
    adv = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=1, keepdims=True) + 1e-6)
    want = np_oisd_weights(adv, mode, 1.0).reshape(-1)
    assert np.abs(want - np.clip(adv, -1, 1).reshape(-1)).max() > 0.1  # differs from signed here
    mask = [np.asarray(b.loss_mask) > 0 for b in updated]
    packed = np.concatenate([np.asarray(b.think_weight)[k] for b, k in zip(updated, mask)])
    np.testing.assert_allclose(np.sort(packed), np.sort(np.repeat(want, lengths)), atol=1e-5)
    pg = np.concatenate([np.asarray(b.advantages)[k] for b, k in zip(updated, mask)])
    np.testing.assert_allclose(np.sort(pg), np.sort(np.repeat(adv.reshape(-1), lengths)), atol=1e-5)
    probe = np.concatenate([np.asarray(b.attn_weight)[np.asarray(b.attn_valid) > 0] for b in updated])
    assert np.abs(probe[:, None] - want[None]).min(axis=1).max() < 1e-5  # each probe has a rollout's weight
    assert np.isfinite(m["loss"]) and (mode != "positive" or m["think_loss"] >= 0)


def test_think_weight_is_what_the_step_weighs_the_lens_by():
    """A batch with think_weight W gives the think/attention loss of the same batch with
    advantages W (signed: clip(W) = W) and the policy loss of its own advantages."""
    from oisd_jax.model import init_params
    from oisd_jax.rl.step import compute_grads
    from oisd_jax.train_setup import make_minibatches
    s, ro, rng = _random_rollouts()
    adv = rng.normal(size=8).astype(np.float32)
    w = rng.uniform(-1, 1, size=8).astype(np.float32)
    params = init_params(s.model_cfg, jax.random.key(0))
    f = jax.jit(lambda p, b: compute_grads(p, b, s.model_cfg, s.step_cfg))
    for b, b_w, b_a in zip(make_minibatches(s, ro, adv, 0, think_w=w), make_minibatches(s, ro, w, 0),
                           make_minibatches(s, ro, adv, 0)):
        m, m_w, m_a = (f(params, x)[2] for x in (b, b_w, b_a))
        for k in ("think_loss", "attn_loss"):
            np.testing.assert_allclose(float(m[k]), float(m_w[k]), rtol=1e-5, atol=1e-7, err_msg=k)
            assert abs(float(m[k]) - float(m_a[k])) > 1e-6, k  # the weight changed it
        np.testing.assert_allclose(float(m["pg_loss"]), float(m_a["pg_loss"]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["positive", "group_centered"])
def test_think_weight_modes_train(tmp_path, mode):
    last = train(tiny(rl__think_weight_mode=mode, train__steps=2, train__checkpoint_every=0,
                      train__sft_warmup_steps=1), str(tmp_path))
    assert np.isfinite(last["loss"]) and np.isfinite(last["think_loss"]) and np.isfinite(last["attn_loss"])


def test_think_weight_mode_is_validated():
    with pytest.raises(ConfigError, match="rl.think_weight_mode"):
        tiny(rl__think_weight_mode="absolute")


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
