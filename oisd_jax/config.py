"""Config validation, algorithm resolution and config-file loading.

`validate` runs before anything compiles and reports every problem at once, each naming
its field path. `algorithm_settings` turns `rl.algorithm` into explicit switches so no
other module branches on the algorithm's name. The schema itself (every field, its
default) lives in configs/base.py; reading config files is oisd_jax.config_files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Iterable, Mapping

import ml_collections

ALGORITHMS = ("grpo", "rloo", "reinforce_pp", "dr_grpo", "bupo", "oisd", "oisd_think_only",
              "oisd_attn_only")
ADV_ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "dr_grpo")
# verl's agg_loss names; seq-mean-token-sum-norm is Dr.GRPO's constant-length normaliser.
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
DATA_FORMATS = ("synthetic", "parquet", "jsonl")
TRUNCATIONS = ("left", "error")
BAD_ROW_POLICIES = ("skip", "error")
COMPUTE_DTYPES = ("bfloat16", "float32", "float16")
PARAM_DTYPES = ("float32", "bfloat16")
# Kept equal to oisd_jax.model.config's tuples; not imported so this module stays a leaf.
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")
ATTN_IMPLS = ("xla", "cudnn", "blocked", "splash")
SCHEDULES = ("constant", "cosine")
REWARDS = ("math", "strict")
SYNTHETIC_OPS = "+-*"
MESH_AXES = ("data", "fsdp", "tensor")
_SUFFIXES = {"parquet": (".parquet",), "jsonl": (".jsonl", ".json")}

# algorithm -> (advantage estimator, L_think on, L_attn on, BuPO internal policy on)
_ALGORITHM_TABLE = {
    "grpo": ("grpo", False, False, False),
    "rloo": ("rloo", False, False, False),
    "reinforce_pp": ("reinforce_pp", False, False, False),
    "dr_grpo": ("dr_grpo", False, False, False),
    "bupo": ("grpo", False, False, True),
    "oisd": ("grpo", True, True, False),
    "oisd_think_only": ("grpo", True, False, False),
    "oisd_attn_only": ("grpo", False, True, False),
}
# rl.loss_agg=None -> the aggregation the algorithm's paper uses (token-mean otherwise).
_ALGORITHM_LOSS_AGG = {"dr_grpo": "seq-mean-token-sum-norm"}


_MISSING = object()


class ConfigError(ValueError):
    """An invalid config; `problems` lists one message per bad field."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = "invalid config: " if n == 1 else f"invalid config ({n} problems):\n  - "
        super().__init__(head + "\n  - ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class AlgorithmSettings:
    """What `rl.algorithm` means, spelled out. Frozen and hashable (a valid jit static arg)."""
    algorithm: str
    adv_estimator: str  # grpo | rloo | reinforce_pp | dr_grpo
    think_weight: float  # lambda_think; 0.0 = L_think off
    attn_weight: float  # lambda_attn; 0.0 = L_attn off
    tap_layer: int | None  # student layer (1-based) for OISD / BuPO; None when unused
    lens_norm: bool  # apply the final norm to the student residual before the unembedding
    bupo_steps: int  # BuPO: RL steps that optimise the internal policy; 0 = never
    oisd_metrics: bool = False  # log the OISD divergences at tap_layer even with their weights 0
    loss_agg: str = "token-mean"  # one of LOSS_AGGS

    @property
    def use_think(self) -> bool:
        return self.think_weight > 0

    @property
    def use_attn(self) -> bool:
        return self.attn_weight > 0

    @property
    def use_bupo(self) -> bool:
        return self.bupo_steps > 0

    def bupo_active(self, step: int) -> bool:
        """Host-side: whether RL step `step` (0-based) trains BuPO's internal policy."""
        return step < self.bupo_steps


def algorithm_settings(config: ml_collections.ConfigDict) -> AlgorithmSettings:
    rl = config.rl
    if rl.algorithm not in _ALGORITHM_TABLE:
        raise ConfigError([f"rl.algorithm={rl.algorithm!r} is not one of {ALGORITHMS}"])
    adv, think, attn, bupo = _ALGORITHM_TABLE[rl.algorithm]
    metrics = bool(rl.get("oisd_metrics", False))
    uses_tap = think or attn or bupo or metrics
    return AlgorithmSettings(
        algorithm=rl.algorithm,
        adv_estimator=rl.adv_estimator or adv,
        think_weight=float(rl.think_weight) if think else 0.0,
        attn_weight=float(rl.attn_weight) if attn else 0.0,
        tap_layer=rl.tap_layer if uses_tap else None,
        lens_norm=bool(rl.bupo_lens_norm if bupo else rl.lens_norm),
        bupo_steps=int(rl.bupo_steps) if bupo else 0, oisd_metrics=metrics,
        loss_agg=rl.loss_agg or _ALGORITHM_LOSS_AGG.get(rl.algorithm, "token-mean"))


# ----------------------------------------------------------------------------- validation
class _Checker:
    """Collects problems; each check reads a dotted field path from the config."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.problems: list[str] = []

    def get(self, path: str) -> Any:
        """The field's value, or _MISSING (reported once) when the path does not exist."""
        node = self.config
        for part in path.split("."):
            try:
                node = node[part]
            except (KeyError, TypeError, AttributeError):
                msg = f"{path} is missing"
                if msg not in self.problems:
                    self.bad(msg)
                return _MISSING
        return node

    def bad(self, msg: str) -> None:
        self.problems.append(msg)

    def choice(self, path: str, choices: Iterable[str]) -> Any:
        v = self.get(path)
        if v is _MISSING:
            return None
        if v not in tuple(choices):
            self.bad(f"{path}={v!r} is not one of {tuple(choices)}")
            return None
        return v

    def number(self, path: str, *, gt: float | None = None, ge: float | None = None,
               lt: float | None = None, le: float | None = None, integer: bool = False,
               optional: bool = False) -> Any:
        v = self.get(path)
        if v is _MISSING or (v is None and optional):
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            self.bad(f"{path}={v!r} must be {'an integer' if integer else 'a number'}")
            return None
        if not math.isfinite(v):
            self.bad(f"{path}={v!r} must be finite")
            return None
        bounds = [(gt, lambda a, b: a > b, ">"), (ge, lambda a, b: a >= b, ">="),
                  (lt, lambda a, b: a < b, "<"), (le, lambda a, b: a <= b, "<=")]
        for bound, ok, sym in bounds:
            if bound is not None and not ok(v, bound):
                self.bad(f"{path}={v!r} must be {sym} {bound}")
                return None
        return v

    def boolean(self, path: str) -> Any:
        v = self.get(path)
        if v is not _MISSING and not isinstance(v, bool):
            self.bad(f"{path}={v!r} must be True or False")
        return v

    def mesh_shape(self, path: str, num_devices: int | None) -> tuple[int, ...] | None:
        shape = self.get(path)
        if shape is None or shape is _MISSING:
            return None
        if (not isinstance(shape, (tuple, list)) or len(shape) != len(MESH_AXES)
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
            self.bad(f"{path}={shape!r} must be {len(MESH_AXES)} integers {MESH_AXES}")
            return None
        if any(s == 0 or s < -1 for s in shape) or list(shape).count(-1) > 1:
            self.bad(f"{path}={tuple(shape)}: axes must be >= 1, with at most one -1 (= the rest)")
            return None
        known = math.prod(s for s in shape if s != -1)
        if num_devices is None:
            return None
        if -1 in shape:
            if num_devices % known:
                self.bad(f"{path}={tuple(shape)}: {num_devices} devices are not divisible by "
                         f"the fixed axes' product {known}")
                return None
            return tuple(num_devices // known if s == -1 else s for s in shape)
        if known != num_devices:
            self.bad(f"{path}={tuple(shape)} needs {known} devices, but {num_devices} are available")
            return None
        return tuple(shape)

    def path_exists(self, path: str, *, directory: bool, must_contain: str | None = None) -> None:
        v = self.get(path)
        if v is None or v is _MISSING:
            return
        p = os.path.expanduser(str(v))
        if not os.path.exists(p):
            self.bad(f"{path}={v!r} does not exist")
        elif directory and not os.path.isdir(p):
            self.bad(f"{path}={v!r} is not a folder")
        elif not directory and os.path.isdir(p):
            self.bad(f"{path}={v!r} is a folder, expected a file")
        elif must_contain and not os.path.exists(os.path.join(p, must_contain)):
            self.bad(f"{path}={v!r} has no {must_contain}")


def resolve_num_layers(config: ml_collections.ConfigDict) -> int | None:
    """Blocks of the configured model: from hf_path's config.json, else the built-in preset.

    None when it cannot be known here (no config.json on disk, or the model package is not
    importable), so validation skips the tap-layer range check instead of failing.
    """
    hf_path = config.model.hf_path
    if hf_path:
        cfg_file = os.path.join(os.path.expanduser(hf_path), "config.json")
        if not os.path.isfile(cfg_file):
            return None
        with open(cfg_file) as f:
            n = json.load(f).get("num_hidden_layers")
        return int(n) if n is not None else None
    try:
        from oisd_jax.model import ModelConfig  # lazy: the model is not a dependency of config
    except ImportError:
        return None
    return ModelConfig.preset(config.model.preset).num_layers


def validate(config: ml_collections.ConfigDict, *, num_layers: int | None = None,
             num_devices: int | None = None, check_paths: bool = True) -> None:
    """Raise ConfigError listing every invalid field of `config`.

    num_layers: decoder blocks of the model (tap-layer range); None = resolve from the config
      (hf_path's config.json or the preset) when possible.
    num_devices: devices of the mesh (mesh-shape product, batch divisibility); None = skip.
    check_paths: whether model/data files and folders must exist (False for shipped paper
      configs, whose paths are placeholders).
    """
    c = _Checker(config)

    # model
    if c.get("model.hf_path") is None and not isinstance(c.get("model.preset"), str):
        c.bad("model.preset must name a built-in model when model.hf_path is None")
    c.choice("model.dtype", COMPUTE_DTYPES)
    c.choice("model.param_dtype", PARAM_DTYPES)
    c.choice("model.remat_policy", REMAT_POLICIES)
    c.choice("model.attn_impl", ATTN_IMPLS)
    c.number("model.attn_block_size", ge=1, integer=True)
    if check_paths:
        c.path_exists("model.hf_path", directory=True, must_contain="config.json")
        c.path_exists("model.tokenizer_path", directory=True)
        c.path_exists("train.init_from_hf", directory=True, must_contain="config.json")

    # mesh and the sampler batch layout
    train_mesh = c.mesh_shape("mesh.shape", num_devices)
    sampler_mesh = train_mesh
    if c.get("mesh.sampler_shape") is not None:
        sampler_mesh = c.mesh_shape("mesh.sampler_shape", num_devices)
    batch = c.number("sampler.batch_size", ge=1, integer=True)
    n = c.number("sampler.n", ge=1, integer=True)
    if sampler_mesh and batch and n and (batch * n) % (sampler_mesh[0] * sampler_mesh[1]):
        c.bad(f"sampler.batch_size * sampler.n = {batch * n} rollouts are not divisible by the "
              f"sampler mesh's data x fsdp = {sampler_mesh[0] * sampler_mesh[1]} devices")

    # data
    fmt = c.choice("data.format", DATA_FORMATS)
    prompt_f, question_f = c.get("data.prompt_field"), c.get("data.question_field")
    if bool(prompt_f) == bool(question_f):
        c.bad(f"data.prompt_field={prompt_f!r} and data.question_field={question_f!r}: set "
              "exactly one (chat-message prompts, or plain questions)")
    for f in ("answer_field", "system_prompt"):
        v = c.get(f"data.{f}")
        if v is not _MISSING and not isinstance(v, str) and not (f == "system_prompt" and v is None):
            c.bad(f"data.{f}={v!r} must be a string")
    max_prompt = c.number("data.max_prompt_len", ge=1, integer=True)
    c.choice("data.truncation", TRUNCATIONS)
    c.choice("data.on_bad_row", BAD_ROW_POLICIES)
    c.number("data.seed", integer=True)
    if fmt in _SUFFIXES:
        train_path = c.get("data.train_path")
        if train_path is _MISSING:
            pass
        elif not train_path:
            c.bad(f"data.train_path is required for data.format={fmt!r}")
        elif not str(train_path).endswith(_SUFFIXES[fmt]):
            c.bad(f"data.train_path={train_path!r} does not end with {_SUFFIXES[fmt]} "
                  f"(data.format={fmt!r})")
        elif check_paths:
            c.path_exists("data.train_path", directory=False)
        if c.get("model.hf_path") is None and c.get("model.tokenizer_path") is None:
            c.bad(f"data.format={fmt!r} needs a real tokenizer: set model.hf_path or "
                  "model.tokenizer_path (the synthetic tokenizer only covers the synthetic task)")
    if fmt == "synthetic":
        c.number("data.synthetic.digits", ge=1, integer=True)
        c.number("data.synthetic.num_terms", ge=2, integer=True)
        c.number("data.synthetic.num_eval", ge=1, integer=True)
        c.boolean("data.synthetic.reasoning")
        ops = c.get("data.synthetic.ops")
        if not isinstance(ops, str) or not ops or set(ops) - set(SYNTHETIC_OPS):
            c.bad(f"data.synthetic.ops={ops!r} must be a non-empty string of {SYNTHETIC_OPS!r}")
    eval_sets = c.get("data.eval_sets")
    for name in (eval_sets.keys() if isinstance(eval_sets, (Mapping, ml_collections.ConfigDict)) else ()):
        base = f"data.eval_sets.{name}"
        c.number(f"{base}.k", ge=1, integer=True)
        path = c.get(f"{base}.path")
        if path is _MISSING:
            continue
        if path is None:
            if fmt in _SUFFIXES:
                c.bad(f"{base}.path is None: only the synthetic task has built-in eval problems")
        elif not str(path).endswith(_SUFFIXES["parquet"] + _SUFFIXES["jsonl"]):
            c.bad(f"{base}.path={path!r} must be a .parquet or .jsonl file")
        elif check_paths:
            c.path_exists(f"{base}.path", directory=False)

    # sampler
    max_new = c.number("sampler.max_new_tokens", ge=1, integer=True)
    c.number("sampler.temperature", gt=0)
    c.number("sampler.top_p", gt=0, le=1)
    c.number("sampler.top_k", ge=0, integer=True)
    c.number("sampler.prompt_bucket", ge=1, integer=True)
    c.choice("sampler.kv_dtype", COMPUTE_DTYPES)
    if "keep_cache" in config.sampler:  # older run configs lack it
        c.boolean("sampler.keep_cache")
    if "decode_segments" in config.sampler:
        c.number("sampler.decode_segments", ge=1, integer=True, optional=True)

    # rl
    algo = c.choice("rl.algorithm", ALGORITHMS)
    if c.get("rl.adv_estimator") is not None:
        c.choice("rl.adv_estimator", ADV_ESTIMATORS)
    c.number("rl.clip_low", ge=0, lt=1)
    c.number("rl.clip_high", ge=0)
    c.number("rl.dual_clip", gt=1)
    c.number("rl.ratio_log_clamp", gt=0)
    if c.get("rl.loss_agg") is not None:
        c.choice("rl.loss_agg", LOSS_AGGS)
    if (c.number("rl.kl_coef", ge=0) or 0) > 0:
        c.bad(f"rl.kl_coef={config.rl.kl_coef} needs a reference policy, which the trainer does not "
              "build yet: set 0")
    c.choice("rl.kl_type", KL_TYPES)
    c.number("rl.entropy_coef", ge=0)
    think = c.number("rl.think_weight", ge=0)
    attn = c.number("rl.attn_weight", ge=0)
    c.number("rl.tau", gt=0)
    c.number("rl.adv_clip", gt=0)
    c.boolean("rl.lens_norm")
    c.boolean("rl.bupo_lens_norm")
    for f in ("attn_steps", "attn_window", "attn_stride", "logit_chunk", "ppo_epochs"):
        c.number(f"rl.{f}", ge=1, integer=True)
    c.number("rl.bupo_steps", ge=0, integer=True)
    mbt = c.number("rl.micro_batch_tokens", ge=1, integer=True)
    if mbt and max_prompt and max_new and mbt < max_prompt + max_new:
        c.bad(f"rl.micro_batch_tokens={mbt} is smaller than one sequence (data.max_prompt_len + "
              f"sampler.max_new_tokens = {max_prompt + max_new})")
    if algo in _ALGORITHM_TABLE:
        _, uses_think, uses_attn, uses_bupo = _ALGORITHM_TABLE[algo]
        tap = c.get("rl.tap_layer")
        metrics = c.boolean("rl.oisd_metrics") if "oisd_metrics" in config.rl else False  # older run configs
        if uses_think or uses_attn or uses_bupo or metrics is True:
            if num_layers is None:
                try:
                    num_layers = resolve_num_layers(config)
                except (ValueError, KeyError, OSError) as e:
                    c.bad(f"model: cannot resolve the number of layers ({e})")
            if tap is None:
                why = f"rl.algorithm={algo!r}" if uses_think or uses_attn or uses_bupo else "rl.oisd_metrics=True"
                c.bad(f"rl.tap_layer must be set for {why} (the student layer)")
            elif isinstance(tap, bool) or not isinstance(tap, int):
                c.bad(f"rl.tap_layer={tap!r} must be an integer")
            elif num_layers is not None and not 1 <= tap <= num_layers - 1:
                c.bad(f"rl.tap_layer={tap} is out of range 1..{num_layers - 1} for a "
                      f"{num_layers}-layer model")
            elif tap < 1:
                c.bad(f"rl.tap_layer={tap} must be >= 1")
        if algo == "oisd_think_only" and think == 0:
            c.bad("rl.think_weight must be > 0 for rl.algorithm='oisd_think_only'")
        if algo == "oisd_attn_only" and attn == 0:
            c.bad("rl.attn_weight must be > 0 for rl.algorithm='oisd_attn_only'")
        if algo == "oisd" and think == 0 and attn == 0:
            logging.warning("rl.algorithm='oisd' with both weights 0 is plain GRPO")
        if algo == "bupo" and c.get("rl.bupo_steps") == 0:
            c.bad("rl.bupo_steps must be > 0 for rl.algorithm='bupo' (0 is plain GRPO)")

    # optim
    c.number("optim.lr", gt=0)
    c.number("optim.b1", ge=0, lt=1)
    c.number("optim.b2", ge=0, lt=1)
    c.number("optim.eps", gt=0)
    c.number("optim.weight_decay", ge=0)
    c.number("optim.grad_clip", ge=0)
    c.boolean("optim.skip_nonfinite")
    c.choice("optim.schedule", SCHEDULES)
    c.number("optim.warmup_steps", ge=0, integer=True)
    c.number("optim.end_lr_factor", ge=0, le=1)

    # train
    c.number("train.steps", ge=1, integer=True)
    pps = c.number("train.prompts_per_step", ge=1, integer=True)
    mbp = c.number("train.mini_batch_prompts", ge=1, integer=True)
    if pps and mbp and pps % mbp:
        c.bad(f"train.prompts_per_step={pps} is not divisible by train.mini_batch_prompts={mbp}")
    c.number("train.seed", integer=True)
    for f in ("sft_warmup_steps", "eval_every", "eval_prompts", "checkpoint_every"):
        c.number(f"train.{f}", ge=0, integer=True)
    if "log_samples" in config.train:  # older run configs lack it
        c.number("train.log_samples", ge=0, integer=True)
    for f in ("sft_batch_size", "log_every", "keep_checkpoints", "reward_workers"):
        c.number(f"train.{f}", ge=1, integer=True)
    c.number("train.sft_lr", gt=0)
    c.number("train.reward_timeout_s", gt=0)
    c.boolean("train.async_checkpoint")
    c.choice("train.reward", REWARDS)

    if c.problems:
        raise ConfigError(c.problems)
