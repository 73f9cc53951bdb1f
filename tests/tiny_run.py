"""One tiny training run shared by test_export / test_analyze / test_evaluate (not a
conftest: only the files that need it import it). The run dir is cached per pytest session
under tmp_path_factory, so the trainer runs once however many tests use it."""
from __future__ import annotations

import jax

from oisd_jax.config import validate
from oisd_jax.config_files import load_config_file

_CACHE: dict[str, str] = {}


def tiny_config(**over):
    """configs/tiny.py shrunk to seconds: 2 warm-up + 2 RL steps, a checkpoint each step."""
    c = load_config_file("configs/tiny.py")
    with c.unlocked():
        c.train.steps = 2
        c.train.sft_warmup_steps = 2
        c.train.sft_batch_size = 8
        c.train.prompts_per_step = 4
        c.train.mini_batch_prompts = 4
        c.train.eval_every = 0
        c.train.checkpoint_every = 1
        c.train.keep_checkpoints = 2
        c.train.async_checkpoint = False
        c.train.reward = "strict"
        c.train.reward_workers = 1
        c.sampler.n = 2
        c.sampler.batch_size = 4
        c.sampler.max_new_tokens = 8
        c.sampler.prompt_bucket = 8
        c.data.max_prompt_len = 24
        # bare-box warm-up targets (6 tokens): these runs test the trainer's mechanics in seconds;
        # the worked chains (~23 tokens) of configs/tiny.py would not fit 8 new tokens
        c.data.synthetic.reasoning = False
        for k, v in over.items():
            sec, name = k.split("__")
            c[sec][name] = v
    validate(c, num_devices=jax.device_count())
    return c


def tiny_run(tmp_path_factory) -> str:
    """The workdir of a finished tiny OISD run (checkpoints at steps 1 and 2, metrics.jsonl)."""
    if "run" not in _CACHE:
        from oisd_jax.train import train
        workdir = str(tmp_path_factory.mktemp("tiny_run"))
        train(tiny_config(), workdir)
        _CACHE["run"] = workdir
    return _CACHE["run"]


def config_leaf_fields(d, prefix: str = ""):
    """Dotted names of a config's leaf fields (data.eval_sets counts as one leaf)."""
    for k, v in d.items():
        if hasattr(v, "items") and k != "eval_sets":
            yield from config_leaf_fields(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"
