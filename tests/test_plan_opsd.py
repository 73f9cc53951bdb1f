"""The planner with OPSD's teacher: its weights resident in the state, its rows in the
batch (packed as the trainer packs them), its forward in the compiled step and the FLOPs."""
import dataclasses
import os

import jax
import numpy as np
import pytest

from oisd_jax import plan
from oisd_jax import plan_programs as pp
from oisd_jax.config_files import load_config_file
from test_plan import TINY, tiny_param_bytes_per_device

OPSD = TINY.replace(":oisd,", ":opsd,") + ",data.teacher_max_prompt_len=96"


def test_plan_counts_the_teacher_weights_rows_and_forward():
    target = plan.get_target("cpu")
    setup = pp.make_setup(load_config_file(OPSD), target.devices(8), micro_batch_tokens=2 * 8 * 80)
    base = pp.make_setup(load_config_file(TINY), target.devices(8), micro_batch_tokens=2 * 8 * 80)
    assert setup.teacher_row_len == 96 + 16 and base.teacher_row_len is None
    results = {r.phase.name: r for r in plan.run_phases(setup, target, only=("train step", "old log-probs"))}
    tr, lp = results["train step"], results["old log-probs"]
    params = tiny_param_bytes_per_device(8)
    M, R, Tt = setup.num_micro, setup.rows_per_micro, setup.teacher_row_len
    Th = 16  # the response budget, a power of two
    # the frozen teacher (f32 compute here) beside the params; teacher rows + both head positions
    batch_extra = 4 * M * (R // 8) * (3 * Tt + 2 * Th)
    base_tr = {r.phase.name: r for r in plan.run_phases(base, target, only=("train step",))}["train step"]
    # OISD's base batch carries probe arrays OPSD's does not: compare the state parts alone
    assert tr.compiled.arguments - pp.shard_bytes(pp.abstract_batch(setup)) == \
        base_tr.compiled.arguments - pp.shard_bytes(pp.abstract_batch(base)) + params
    assert pp.shard_bytes(pp.abstract_batch(setup)) >= batch_extra
    assert lp.phase.resident_bytes >= 3 * params  # moments + the teacher stay resident beside it
    fl, fl0 = (plan.step_flops(s, mean_prompt=16, response_frac=1.0) for s in (setup, base))
    m = setup.model
    t_seq = 96 + 16
    tokens = 16 * 4 * t_seq
    teacher = (2 * setup.matmul_params * tokens + 4 * m.num_layers * m.num_heads * m.head_dim * (t_seq + 1) / 2 * tokens
               - 2 * m.hidden_size * m.vocab_size * (tokens - 16 * 4 * 16))
    lens = 4 * 2 * m.hidden_size * m.vocab_size * fl0["tokens"]  # OISD's lens head, which OPSD has not
    assert fl["train"] == pytest.approx(fl0["train"] - lens + teacher)


def test_plan_ogls_sd_batch_carries_the_pools_and_compiles():
    """ogls_sd: the batch adds the three [M, R, T] pool fields to OPSD's; the two-pass step
    compiles for the plan."""
    target = plan.get_target("cpu")
    ogls = pp.make_setup(load_config_file(OPSD.replace(":opsd,", ":ogls_sd,")), target.devices(8),
                         micro_batch_tokens=2 * 8 * 80)
    opsd = pp.make_setup(load_config_file(OPSD), target.devices(8), micro_batch_tokens=2 * 8 * 80)
    b = pp.abstract_batch(ogls)
    M, R, T = ogls.num_micro, ogls.rows_per_micro, ogls.row_len
    assert b.steer_group.shape == b.steer_weight.shape == (M, R, T) and pp.abstract_batch(opsd).steer_group is None
    assert pp.shard_bytes(b) - pp.shard_bytes(pp.abstract_batch(opsd)) == 3 * 4 * M * (R // 8) * T
    tr = {r.phase.name: r for r in plan.run_phases(ogls, target, only=("train step",))}["train step"]
    assert tr.compiled.arguments > 0
    # FLOPs: the steering pass is a second teacher forward (and teacher head) per update
    fl, fl_opsd, fl_none = (plan.step_flops(s, mean_prompt=16, response_frac=1.0)["train"]
                            for s in (ogls, opsd, dataclasses.replace(opsd, teacher_row_len=None)))
    assert fl - fl_opsd == pytest.approx(fl_opsd - fl_none) and fl > fl_opsd


def test_planner_packs_opsd_like_the_trainer():
    """qwen3_4b:opsd on 4 GPUs: the planner's student and teacher shapes are the trainer's
    for a mini-batch of full-length rollouts and full-length teacher prompts."""
    from oisd_jax import parallel
    from oisd_jax.config import algorithm_settings
    from oisd_jax.rollout import Rollouts
    from oisd_jax.run_spec import resolve, step_config
    from oisd_jax.train_setup import Setup, make_minibatches
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config_file(os.path.join(root, "configs", "qwen3_4b.py") + ":opsd")
    setup = pp.make_setup(c, plan.get_target("cpu").devices(4))
    s = Setup(config=c, algo=algorithm_settings(c), tokenizer=None, model_cfg=None,
              mesh=parallel.make_mesh(tuple(c.mesh.shape), jax.devices()[:4]), step_cfg=step_config(c), step_fns={},
              logprob_fns={}, sampler=None, sampling=None, records=[], eval_sets={}, peak_flops=float("nan"),
              spec=resolve(c, num_devices=None, check_paths=False))
    P, Pt, N, n = 1024, int(c.data.teacher_max_prompt_len), int(c.sampler.max_new_tokens), int(c.sampler.n)
    prompts = int(c.train.mini_batch_prompts)
    responses = [np.ones(N, np.int32)] * (prompts * n)
    ro = Rollouts([np.ones(P, np.int32)] * prompts, responses, responses, [""] * len(responses), n=n)
    (b,) = make_minibatches(s, ro, np.ones(len(responses), np.float32), 0, [np.ones(Pt, np.int32)] * prompts)
    a = pp.abstract_batch(setup)
    for f in ("tokens", "head_positions", "teacher_tokens", "teacher_head_positions"):
        assert getattr(b, f).shape == getattr(a, f).shape, f
