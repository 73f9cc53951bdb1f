"""run_spec.resolve: one reading of the config for train, evaluate, plan and export; and
config.migrate, the one place older saved run configs are brought to the current schema."""
import pathlib

import ml_collections
import pytest

from oisd_jax.config import ConfigError, migrate, validate
from oisd_jax.config_files import load_config_file
from oisd_jax.data.teacher import DEFAULT_TEACHER_TEMPLATE
from oisd_jax.run_spec import resolve

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py") + ":"
# Fields a run saved before they existed lacks, and what such a run did.
ADDED = {"mesh.sampler_shape": None, "sampler.keep_cache": True, "sampler.decode_segments": None,
         "rl.oisd_metrics": False, "rl.ppo_epochs": 1, "optim.skip_nonfinite": True,
         "optim.end_lr_factor": 0.0, "train.log_samples": 0,
         # OPSD and the reference policy: none of those runs had a teacher or a KL
         "rl.pg_weight": None, "rl.opsd_weight": None, "rl.opsd_beta": 0.0, "rl.opsd_token_clip": 0.05,
         "rl.opsd_top_k": 0, "rl.teacher": "frozen", "rl.teacher_decay": 0.999, "data.solution_field": None,
         "data.teacher_max_prompt_len": 1536, "data.teacher_template": DEFAULT_TEACHER_TEMPLATE,
         # OGLS-SD: read only when rl.algorithm=ogls_sd, which no older run used
         "rl.ogls_alpha": 1.0, "rl.ogls_unit": "token", "rl.ogls_divergence": "reverse_kl"}


def _without(config, paths):
    d = config.to_dict()
    for path in paths:
        *parents, leaf = path.split(".")
        node = d
        for p in parents:
            node = node[p]
        del node[leaf]
    return ml_collections.ConfigDict(d)


def test_an_older_run_config_is_migrated_in_one_place():
    old = _without(load_config_file(TINY), ADDED)
    with pytest.raises(ConfigError) as e:  # unmigrated: every missing field named
        validate(old, num_layers=4, check_paths=False)
    assert sorted(e.value.problems) == sorted(f"{p} is missing" for p in ADDED)
    new = migrate(old)
    for path, value in ADDED.items():
        node = new
        for p in path.split("."):
            node = node[p]
        assert node == value, path
    spec = resolve(new, num_devices=8, check_paths=False)
    assert (spec.sampler.keep_cache, spec.sampler.decode_segments, spec.train.log_samples) == (True, None, 0)
    assert (spec.train.ppo_epochs, spec.step.skip_nonfinite, spec.step.end_lr_factor) == (1, True, 0.0)
    assert spec.mesh.sampler_shape is None and spec.algo.oisd_metrics is False
    assert (spec.step.pg_weight, spec.step.opsd_weight, spec.step.ref_resident) == (1.0, 0.0, False)
    # fields the run did save are kept
    kept = migrate(_without(load_config_file(TINY + "sampler.keep_cache=False"), ["train.log_samples"]))
    assert kept.sampler.keep_cache is False and kept.train.log_samples == 0


def test_loss_and_sampling_temperature_are_one_reading():
    spec = resolve(load_config_file(TINY + "sampler.temperature=0.7"), num_devices=8, check_paths=False)
    assert spec.step.temperature == spec.sampler.sampling.temperature == 0.7
    b = resolve(load_config_file(TINY + "bupo,rl.tap_layer=2,sampler.temperature=0.6"), num_devices=8,
                check_paths=False)
    assert b.step_config(bupo=True).bupo and b.step_config(bupo=True).temperature == 0.6


def test_resolve_validates_first_and_refuses_bupo_phases_of_other_algorithms():
    with pytest.raises(ConfigError, match="sampler.temperature"):
        resolve(load_config_file(TINY + "sampler.temperature=0.0"), num_devices=8, check_paths=False)
    spec = resolve(load_config_file(TINY), num_devices=8, check_paths=False)
    assert spec.bupo_step is None
    with pytest.raises(ValueError, match="not bupo"):
        spec.step_config(bupo=True)


def test_sections_carry_what_the_trainer_reads():
    c = load_config_file(TINY + "oisd,rl.tap_layer=2,rl.think_weight=0.25,rl.ppo_epochs=2")
    spec = resolve(c, num_devices=8, check_paths=False)
    t = spec.train
    assert spec.step.think_weight == spec.algo.think_weight == 0.25
    assert t.updates_per_step == (t.prompts_per_step // t.mini_batch_prompts) * 2
    assert spec.step.decay_steps == t.steps * t.updates_per_step
    assert spec.packing.row_len == int(c.data.max_prompt_len) + int(c.sampler.max_new_tokens)
    assert spec.packing.attn_steps == int(c.rl.attn_steps)  # L_attn on
    g = resolve(load_config_file(TINY + "grpo"), num_devices=8, check_paths=False)
    assert g.packing.attn_steps == 0  # no probes without L_attn or its metrics
    assert [e.name for e in spec.eval.sets] == list(c.data.eval_sets.keys())
