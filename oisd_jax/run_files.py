"""Reading a run: the config saved with its checkpoints, its tokenizer and model config
(the trainer's rules), and the master params of one step restored alone (orbax partial
restore: neither the optimizer moments, 2x the params, nor the data state are read).

The trainer (train_setup), evaluate, analyze and export all read runs through here.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import serialization

from oisd_jax import parallel
from oisd_jax.checkpoint import ITEMS
from oisd_jax.cli import UserError
from oisd_jax.config import migrate
from oisd_jax.model import ModelConfig, Params, abstract
from oisd_jax.run_spec import ModelSpec, model_spec



def checkpoint_dir(workdir: str | os.PathLike) -> str:
    """`<workdir>/checkpoints` (the trainer's layout), or `workdir` if it is that folder."""
    workdir = os.path.abspath(workdir)  # orbax refuses relative checkpoint paths
    sub = os.path.join(workdir, "checkpoints")
    return sub if os.path.isdir(sub) else workdir


def manager(ckpt_dir: str) -> ocp.CheckpointManager:
    """A read-only orbax manager over a run's checkpoint folder."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint folder at {ckpt_dir}")
    return ocp.CheckpointManager(ckpt_dir, item_names=ITEMS,
                                 options=ocp.CheckpointManagerOptions(read_only=True))


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Saved steps of a run, oldest first."""
    return sorted(manager(checkpoint_dir(workdir)).all_steps())


def pick_step(mgr: ocp.CheckpointManager, step: int | None, where: str) -> int:
    """`step` if saved, the newest when None; FileNotFoundError naming what is there."""
    steps = sorted(mgr.all_steps())
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {where}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint step {step} in {where} (saved: {steps})")
    return step


def read_run_config(workdir: str | os.PathLike, step: int | None = None) -> ml_collections.ConfigDict:
    """The config a run saved with its checkpoint `step` (None = newest), migrated to the
    current schema (oisd_jax.config.migrate: the one place older run configs are handled)."""
    ckpt = checkpoint_dir(workdir)
    m = manager(ckpt)
    step = pick_step(m, step, ckpt)
    try:
        d = m.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    except Exception as e:  # a truncated JSON item, a missing folder
        raise UserError(f"checkpoint step {step} in {ckpt}: its saved config is unreadable "
                        f"({type(e).__name__}: {str(e)[:300]}); pass --config") from e
    if not d:
        raise ValueError(f"checkpoint step {step} in {ckpt} has no saved config: pass --config")
    return migrate(ml_collections.ConfigDict(d))


def restore_params(workdir: str | os.PathLike, model_cfg: ModelConfig, *, step: int | None = None,
                   mesh: jax.sharding.Mesh | None = None, dtype=None,
                   rules=parallel.RULES) -> tuple[int, Params]:
    """(step, TrainState.params) of checkpoint `step` (None = newest), read straight into
    the shardings of `rules` on `mesh` (default: all devices, the training layout)."""
    ckpt = checkpoint_dir(workdir)
    m = manager(ckpt)
    step = pick_step(m, step, ckpt)
    mesh = mesh if mesh is not None else parallel.make_mesh((1, -1, 1))
    target = abstract(model_cfg, mesh=mesh, dtype=dtype or model_cfg.param_dtype, rules=rules)
    item = {"params": serialization.to_state_dict(target)}
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), item)
    try:
        out = m.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)))
    except Exception as e:  # orbax/tensorstore raise many types: name the step and folder
        raise UserError(f"checkpoint step {step} in {ckpt} is unreadable ({type(e).__name__}: "
                        f"{str(e)[:300]})") from e
    return step, serialization.from_state_dict(target, out.state["params"])


def run_tokenizer(config):
    """The tokenizer a run trains with (train_setup, evaluate and export all use this)."""
    from oisd_jax import data as D
    m = model_spec(config)
    if config.data.format == "synthetic" and not m.tokenizer_path:
        return D.synthetic_tokenizer()
    return D.load_tokenizer(m.tokenizer_path or m.hf_path)


def model_config_for(model: ModelSpec, tokenizer) -> ModelConfig:
    """The ModelConfig a run trains with: preset or hf_path, run settings, EOS ids merged
    with the tokenizer's (the trainer's rule, so exported folders stop where rollouts did)."""
    # Defined here (not in train_setup) so exporting and evaluating need neither the
    # sampler nor the train step; train_setup imports it.
    run = model.run_settings
    cfg = ModelConfig.from_hf(model.hf_path, **run) if model.hf_path else ModelConfig.preset(model.preset, **run)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"model.tokenizer_path: {len(tokenizer)} tokens > the model's vocab_size {cfg.vocab_size}")
    tok_eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eos = tuple(dict.fromkeys([*cfg.eos_token_ids, *tok_eos]))
    if not eos:
        raise ValueError("no EOS id: neither the model's config.json nor the tokenizer defines one")
    return cfg.replace(eos_token_ids=eos)


def run_model_config(config, tokenizer) -> ModelConfig:
    """`model_config_for` of a run config's model section."""
    return model_config_for(model_spec(config), tokenizer)


@dataclasses.dataclass
class Run:
    config: Any
    tokenizer: Any
    model_cfg: ModelConfig
    params: Params
    step: int | None  # checkpoint step; None for a Hugging Face folder
    source: str       # "workdir@step" or "hf:DIR", for reports


def load_run(workdir: str | os.PathLike, *, step: int | None = None, config=None,
             mesh: jax.sharding.Mesh | None = None) -> Run:
    """Config (given, else the checkpoint's), tokenizer, model config and master params."""
    config = config if config is not None else read_run_config(workdir, step)
    tokenizer = run_tokenizer(config)
    model_cfg = run_model_config(config, tokenizer)
    mesh = mesh if mesh is not None else parallel.make_mesh(tuple(config.mesh.shape))
    step, params = restore_params(workdir, model_cfg, step=step, mesh=mesh)
    return Run(config, tokenizer, model_cfg, params, step, f"{os.path.abspath(workdir)}@{step}")


def load_hf_run(hf_dir: str | os.PathLike, config, mesh: jax.sharding.Mesh | None = None) -> Run:
    """A Hugging Face folder evaluated under `config`'s run settings (dtype, sampler, data).

    The folder replaces model.hf_path; its tokenizer is used unless the config names one
    (or the run is synthetic with no tokenizer_path: the exported synthetic tokenizer is
    the same one).
    """
    from oisd_jax.model import load_hf
    hf_dir = os.path.abspath(hf_dir)
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
    config.model.hf_path = hf_dir
    tokenizer = run_tokenizer(config)
    model_cfg = run_model_config(config, tokenizer)
    mesh = mesh if mesh is not None else parallel.make_mesh(tuple(config.mesh.shape))
    _, params = load_hf(hf_dir, dtype=config.model.param_dtype, mesh=mesh)
    return Run(config, tokenizer, model_cfg, params, None, f"hf:{hf_dir}")
