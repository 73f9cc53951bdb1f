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
from oisd_jax.rl.step import abstract_train_state
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
    from oisd_jax.rl.step import init_train_state
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
