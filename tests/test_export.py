"""export: a training checkpoint -> a Hugging Face folder that transformers loads with the
same logits as the JAX model, and the run's tokenizer next to it."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from oisd_jax import export, run_files
from oisd_jax.checkpoint import Checkpointer
from oisd_jax.data import synthetic_tokenizer
from oisd_jax.model import forward, logits
from oisd_jax.rl.train_state import abstract_train_state
from oisd_jax.train_setup import build_setup
from tiny_run import tiny_config, tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def _trainer_params(workdir, step):
    """Params as the trainer itself restores them (the full TrainState), for comparison."""
    s = build_setup(tiny_config())
    with Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ck:
        r = ck.restore(step, abstract_state=abstract_train_state(s.model_cfg, s.step_cfg, s.mesh))
    return s.model_cfg, r.state.params


def _tokens(tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "what is 12+30?"}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    rng = np.random.default_rng(0)
    tail = rng.integers(0, len(tok), 12)
    return np.asarray([*prompt, *tail], np.int32)[None]


@pytest.mark.parametrize("step", [None, 1])
def test_export_logits_match_transformers(run_dir, tmp_path, step):
    out = export.export(run_dir, tmp_path / "hf", step=step)
    cfg, params = _trainer_params(run_dir, step or 2)
    tok = synthetic_tokenizer()
    ids = _tokens(tok)
    want = np.asarray(logits(params, cfg, forward(params, cfg, jnp.asarray(ids)).hidden))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4
    if step == 1:  # a chosen step really is that step, not the newest
        _, newest = _trainer_params(run_dir, 2)
        assert np.abs(np.asarray(newest.embed) - np.asarray(params.embed)).max() > 0


def test_export_tokenizer_and_configs(run_dir, tmp_path):
    out = export.export(run_dir, tmp_path / "hf")
    tok, ref = transformers.AutoTokenizer.from_pretrained(out), synthetic_tokenizer()
    msgs = [{"role": "user", "content": "what is 97-45?"}]
    for t in (tok, ref):
        assert t.eos_token == "<eos>"
    assert (tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
            == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    text = "7*3=21, so \\boxed{21}"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.decode(ref(text)["input_ids"]) == text
    hf_cfg = json.load(open(os.path.join(out, "config.json")))
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert hf_cfg["eos_token_id"] == gen["eos_token_id"] == ref.eos_token_id
    assert hf_cfg["bos_token_id"] == ref.bos_token_id
    # export's model-config rule is the one the trainer builds its model with
    c = tiny_config()
    assert build_setup(c).model_cfg == run_files.run_model_config(c, ref)


def test_export_bfloat16(run_dir, tmp_path):
    out = export.export(run_dir, tmp_path / "hf16", dtype="bfloat16")
    header = open(os.path.join(out, "model.safetensors"), "rb").read(4096)
    assert b'"BF16"' in header and b'"F32"' not in header
    cfg, params = _trainer_params(run_dir, 2)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    ids = _tokens(synthetic_tokenizer())
    want = np.asarray(logits(p16, cfg, forward(p16, cfg, jnp.asarray(ids)).hidden))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4  # same rounded weights, f32 compute on both sides


def test_restore_params_is_the_trainers(run_dir):
    cfg, params = _trainer_params(run_dir, 1)
    step, mine = run_files.restore_params(run_dir, cfg, step=1)
    assert step == 1
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                         params, mine))
    assert max(diffs) == 0.0
    assert run_files.checkpoint_steps(run_dir) == [1, 2]
    with pytest.raises(FileNotFoundError, match="saved"):
        run_files.restore_params(run_dir, cfg, step=7)
