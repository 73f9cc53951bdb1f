"""The trainer with a second policy: configs/tiny.py:opsd and GRPO + KL run end to end
through train(), the teacher / reference resident in the checkpointed state, and the
validation of the new fields."""
import json

import jax
import numpy as np
import pytest

from oisd_jax.checkpoint import Checkpointer
from oisd_jax.config import ConfigError, validate
from oisd_jax.config_files import load_config_file
from oisd_jax.rl.train_state import abstract_train_state
from oisd_jax.train import train
from oisd_jax.train_setup import build_setup
from tiny_run import tiny_config


def _restore(workdir, config):
    s = build_setup(config)
    with Checkpointer(workdir / "checkpoints", async_save=False) as ck:
        return ck.restore(abstract_state=abstract_train_state(s.model_cfg, s.step_cfg, s.mesh)).state


def test_tiny_opsd_runs_end_to_end(tmp_path):
    """`--config=configs/tiny.py:opsd` (shrunk): OPSD's loss is logged and finite, L_pg has
    weight 0, the frozen teacher is in the checkpoint, unchanged by the RL updates."""
    config = tiny_config(rl__algorithm="opsd", train__steps=2)
    last = train(config, str(tmp_path))
    rec = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == [1, 2]
    assert all(np.isfinite(r["opsd_loss"]) and r["update_skipped"] == 0 for r in rec)
    assert last["loss"] == pytest.approx(last["opsd_loss"], rel=1e-5)  # pg weight 0: the loss is OPSD's
    state = _restore(tmp_path, config)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ref_params)))
    assert moved > 0  # the student left its teacher behind


def test_tiny_grpo_with_kl_runs_end_to_end(tmp_path):
    """rl.kl_coef > 0 (refused before): the KL to the frozen initial policy is logged, grows
    from 0 as the policy moves, and the reference stays the warm-up's weights."""
    config = tiny_config(rl__algorithm="grpo", rl__kl_coef=0.1, rl__kl_type="k3", train__steps=2,
                         train__mini_batch_prompts=2)
    train(config, str(tmp_path))
    rec = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["kl"]) for r in rec) and rec[-1]["kl"] > 0
    assert _restore(tmp_path, config).ref_params is not None


def test_presets_validate_and_refusals():
    for spec in ("configs/tiny.py:opsd", "configs/qwen3_4b.py:opsd", "configs/qwen3_4b.py:opsd_v1",
                 "configs/qwen3_4b.py:grpo,rl.kl_coef=0.001"):
        validate(load_config_file(spec), check_paths=False)
    v1 = load_config_file("configs/qwen3_4b.py:opsd_v1")
    assert v1.rl.opsd_beta == 0.5 and v1.rl.opsd_token_clip == 0
    bad = [("rl.kl_coef=0.1,rl.teacher=ema", "rl.kl_coef=0.1 needs rl.teacher='frozen'"),
           ("opsd,rl.opsd_weight=0.0", "rl.opsd_weight must be > 0"),
           ("bupo,rl.tap_layer=2,rl.opsd_weight=1.0", "does not combine with rl.algorithm='bupo'"),
           ("opsd,rl.opsd_beta=1.5", "rl.opsd_beta"),
           ("opsd,data.teacher_template=no placeholders", "data.teacher_template")]
    with pytest.raises(ConfigError, match="rl.opsd_top_k=100 exceeds the model's vocabulary"):
        validate(load_config_file("configs/tiny.py:opsd,rl.opsd_top_k=100"))  # the tiny model has 64 tokens
    for arg, msg in bad:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            validate(load_config_file(f"configs/tiny.py:{arg}"), check_paths=False)


def test_ogls_presets_fields_and_refusals():
    """`:ogls_sd` presets validate; its fields reach the StepConfig (reverse KL = beta 1, or
    the JSD with rl.opsd_beta; groups = the prompts of a mini-batch); bad values are refused
    naming the field."""
    from oisd_jax.run_spec import step_config
    for spec in ("configs/tiny.py:ogls_sd", "configs/qwen3_4b.py:ogls_sd", "configs/qwen3_8b.py:ogls_sd"):
        validate(load_config_file(spec), check_paths=False)
    sc = step_config(load_config_file("configs/tiny.py:ogls_sd,rl.ogls_unit=sequence"))
    assert (sc.ogls_alpha, sc.ogls_unit, sc.ogls_groups, sc.opsd_beta, sc.pg_weight) == (1.0, "sequence", 16, 1.0, 0.0)
    sc = step_config(load_config_file("configs/tiny.py:ogls_sd,rl.ogls_divergence=jsd,rl.opsd_beta=0.5"))
    assert sc.opsd_beta == 0.5 and sc.steer_on
    assert not step_config(load_config_file("configs/tiny.py:opsd")).steer_on
    for arg, msg in [("ogls_sd,rl.ogls_alpha=0.0", "rl.ogls_alpha"), ("ogls_sd,rl.ogls_unit=word", "rl.ogls_unit"),
                     ("ogls_sd,rl.ogls_divergence=kl", "rl.ogls_divergence"),
                     ("ogls_sd,rl.opsd_weight=0.0", "rl.opsd_weight must be > 0")]:
        with pytest.raises(ConfigError, match=msg):
            validate(load_config_file(f"configs/tiny.py:{arg}"), check_paths=False)


def test_teacher_prompt_from_the_data(tmp_path):
    """data.solution_field is read (and falls back to the answer), the template is filled
    without touching its other braces, and the teacher prompt goes through the chat template."""
    from oisd_jax.data import DEFAULT_TEACHER_TEMPLATE, QA_FIELDS, TeacherPrompt, read_records, synthetic_tokenizer
    from oisd_jax.data.pipeline import make_prompt_dataset
    from oisd_jax.data.tokenize import encode_prompt
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "what is 2+3?", "answer": "5", "sol": "2+3=5 so \\boxed{5}"}) + "\n")
    fields = QA_FIELDS.__class__(prompt=None, question="question", answer="answer", solution="sol")
    (rec,), _ = read_records(path, fields)
    assert rec["solution"] == "2+3=5 so \\boxed{5}"
    msgs = TeacherPrompt().messages(rec)
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    text = msgs[0]["content"]
    assert text.startswith("Problem: what is 2+3?") and "2+3=5 so \\boxed{5}" in text
    assert text.endswith("within \\boxed{}.") and "{problem}" not in text and "{solution}" not in text
    assert text.count("{") == DEFAULT_TEACHER_TEMPLATE.count("{") - 2 + 1  # placeholders gone, boxed{} kept
    (plain,), _ = read_records(path, QA_FIELDS)  # no solution field: the teacher sees the answer
    assert "=== BEGIN REFERENCE SOLUTION ===\n5\n=== END REFERENCE SOLUTION ===" in TeacherPrompt().messages(plain)[0][
        "content"]
    tok = synthetic_tokenizer()
    tp = TeacherPrompt("{problem} the answer is {solution}", 64)
    ex = next(make_prompt_dataset([rec], tok, max_prompt_len=32, seed=0, teacher=tp))
    want = encode_prompt(tok, [{"role": "user", "content": "what is 2+3? the answer is 2+3=5 so \\boxed{5}"}])
    np.testing.assert_array_equal(ex["teacher_ids"], want)
    assert ex["teacher_cut"] == 0 and 3 not in want.tolist()  # no <unk>: the tiny template's words are known


def test_tiny_ogls_sd_runs_end_to_end(tmp_path, monkeypatch):
    """`--config=configs/tiny.py:ogls_sd` (shrunk): the two-pass step runs in train(), the
    steered OPSD loss is logged and finite, L_pg has weight 0, groups get steered. Two
    warm-up steps leave the model unable to box an answer (every reward 0: nothing to
    steer), so the rewards alternate right / wrong within each group here."""
    from oisd_jax import rollout
    monkeypatch.setattr(rollout, "score", lambda pool, texts, answers: (np.arange(len(texts)) % 2).astype(np.float32))
    config = tiny_config(rl__algorithm="ogls_sd", train__steps=2)
    assert config.rl.ogls_alpha > 0 and config.rl.ogls_divergence == "reverse_kl"
    last = train(config, str(tmp_path))
    rec = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == [1, 2]
    assert all(np.isfinite(r["opsd_loss"]) and r["update_skipped"] == 0 for r in rec)
    assert last["loss"] == pytest.approx(last["opsd_loss"], rel=1e-5)
    # every group mixed, unless a rollout's empty response was dropped (its group lacks a pool)
    assert all(1 <= r["ogls_steered_groups"] <= config.train.mini_batch_prompts for r in rec)
