"""Config validation, algorithm resolution and the migration of older run configs.

`validate` runs before anything compiles and reports every problem at once, each naming
its field path; it is one small function per section over the checks of
oisd_jax.config_checker, with the choice lists of oisd_jax.choices. `algorithm_settings`
turns `rl.algorithm` into explicit switches so no other module branches on the
algorithm's name. `migrate` fills the fields an older saved run config lacks. The schema
itself (every field, its default) lives in configs/base.py; reading config files is
oisd_jax.config_files; reading a validated config into typed settings is oisd_jax.run_spec.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Iterable, Mapping

import ml_collections

# The choice lists live in oisd_jax.choices (one declaration each); re-exported here.
from oisd_jax.choices import (  # noqa: F401
    ADV_ESTIMATORS, ALGORITHMS, ATTN_IMPLS, BAD_ROW_POLICIES, COMPUTE_DTYPES, DATA_FORMATS, KL_TYPES,
    LOSS_AGGS, MESH_AXES, PARAM_DTYPES, REMAT_POLICIES, REWARDS, SAMPLER_ENGINES, SCHEDULES, SYNTHETIC_OPS,
    TEACHERS, TRUNCATIONS, THINK_WEIGHT_MODES, PAGED_IMPLS)
from oisd_jax.choices import OGLS_DIVERGENCES, OGLS_UNITS, SYNTHETIC_PROSE
from oisd_jax.config_checker import MISSING, Checker

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
    "opsd": ("grpo", False, False, False),  # pg weight 0, OPSD weight 1 (AlgorithmSettings)
    "ogls_sd": ("grpo", False, False, False),  # opsd's, toward the outcome-steered teacher (ogls_alpha)
}
# rl.loss_agg=None -> the aggregation the algorithm's paper uses (token-mean otherwise).
_ALGORITHM_LOSS_AGG = {"dr_grpo": "seq-mean-token-sum-norm"}


class ConfigError(ValueError):
    """An invalid config; `problems` lists one message per bad field."""

    def __init__(self, problems: Iterable[str] | str):
        if isinstance(problems, str):
            # ml_collections' config flag re-raises `type(e)(message + traceback)`: keep only
            # the original message (iterating the string gave one "problem" per character).
            problems = [_original_message(problems)]
        self.problems = list(problems)
        n = len(self.problems)
        head = "invalid config: " if n == 1 else f"invalid config ({n} problems):\n  - "
        super().__init__(head + "\n  - ".join(self.problems))


def _original_message(text: str) -> str:
    """The message of the innermost exception in a formatted traceback, else `text`."""
    lines = text.rstrip().splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    if not starts:
        return text
    tail = lines[starts[-1] + 1:]
    heads = [i for i, ln in enumerate(tail) if ln and not ln[0].isspace()]  # "pkg.Error: message"
    if not heads:
        return text
    first = tail[heads[-1]]
    name, sep, msg = first.partition(": ")
    msg = msg if sep else first
    msg = msg.removeprefix("invalid config: ")
    rest = [ln.strip().removeprefix("- ") for ln in tail[heads[-1] + 1:] if ln.strip()]
    return "; ".join([msg.rstrip(":"), *rest]) if rest else msg


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
    pg_weight: float = 1.0  # weight of L_pg (0 for OPSD alone)
    opsd_weight: float = 0.0  # weight of OPSD's divergence to the teacher; 0 = no teacher forward
    think_weight_mode: str = "signed"  # one of THINK_WEIGHT_MODES: the OISD weight of L_think and L_attn
    ogls_alpha: float | None = None  # OGLS-SD's steering scale; None = the teacher unsteered

    @property
    def use_think(self) -> bool:
        return self.think_weight > 0

    @property
    def use_attn(self) -> bool:
        return self.attn_weight > 0

    @property
    def use_opsd(self) -> bool:
        return self.opsd_weight > 0

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
    metrics = bool(rl.oisd_metrics)
    uses_tap = think or attn or bupo or metrics
    return AlgorithmSettings(
        algorithm=rl.algorithm,
        adv_estimator=rl.adv_estimator or adv,
        think_weight=float(rl.think_weight) if think else 0.0,
        attn_weight=float(rl.attn_weight) if attn else 0.0,
        tap_layer=rl.tap_layer if uses_tap else None,
        lens_norm=bool(rl.bupo_lens_norm if bupo else rl.lens_norm),
        bupo_steps=int(rl.bupo_steps) if bupo else 0, oisd_metrics=metrics,
        loss_agg=rl.loss_agg or _ALGORITHM_LOSS_AGG.get(rl.algorithm, "token-mean"),
        pg_weight=_or(rl.pg_weight, 0.0 if rl.algorithm in _TEACHER_ALGORITHMS else 1.0),
        opsd_weight=_or(rl.opsd_weight, 1.0 if rl.algorithm in _TEACHER_ALGORITHMS else 0.0),
        think_weight_mode=rl.think_weight_mode,
        ogls_alpha=float(rl.ogls_alpha) if rl.algorithm == "ogls_sd" else None)


_TEACHER_ALGORITHMS = ("opsd", "ogls_sd")  # distillation alone: pg weight 0, OPSD weight 1


def _or(value, default: float) -> float:
    return default if value is None else float(value)


# ----------------------------------------------------------------------------- older run configs
# Fields added after runs were first saved, with the value those runs behaved as. Applied
# once, where a saved run config is read (run_files.read_run_config); nothing else needs
# defaults for missing fields.
_ADDED_FIELDS = {
    "mesh.sampler_shape": None, "sampler.keep_cache": True, "sampler.decode_segments": None,
    "rl.oisd_metrics": False, "rl.ppo_epochs": 1, "optim.skip_nonfinite": True,
    "optim.end_lr_factor": 0.0, "train.log_samples": 0,
    "train.max_skipped_updates": 0, "train.allow_config_change": False,
    "sampler.engine": "static", "sampler.slots": 64, "sampler.page_size": 16, "sampler.pool_pages": None,
    "rl.pg_weight": None, "rl.opsd_weight": None, "rl.opsd_beta": 0.0, "rl.opsd_token_clip": 0.05,
    "rl.opsd_top_k": 0, "rl.teacher": "frozen", "rl.teacher_decay": 0.999, "data.solution_field": None,
    "data.teacher_template": None, "data.teacher_max_prompt_len": 1536,  # template: filled in migrate
    "rl.think_weight_mode": "signed",
    "rl.ogls_alpha": 1.0, "rl.ogls_unit": "token", "rl.ogls_divergence": "reverse_kl",
    "sampler.paged_impl": "gather",
}


def migrate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of a saved run config with every field added since filled in (see _ADDED_FIELDS)."""
    from oisd_jax.data.teacher import DEFAULT_TEACHER_TEMPLATE  # lazy: config stays light to import
    out = ml_collections.ConfigDict(config.to_dict())
    for path, default in {**_ADDED_FIELDS, "data.teacher_template": DEFAULT_TEACHER_TEMPLATE}.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node[p]
        if leaf not in node:
            node[leaf] = default
    return out


# ----------------------------------------------------------------------------- validation
def _model_dims(config: ml_collections.ConfigDict) -> dict | None:
    """The configured model's sizes: hf_path's config.json as a dict, or the preset's
    (num_hidden_layers, vocab_size, max_position_embeddings); None when hf_path has no
    config.json. Raises what reading the file raises; ImportError when the model package
    is not importable (preset)."""
    hf_path = config.model.get("hf_path")
    if hf_path:
        cfg_file = os.path.join(os.path.expanduser(hf_path), "config.json")
        if not os.path.isfile(cfg_file):
            return None
        with open(cfg_file) as f:
            return json.load(f)
    from oisd_jax.model import ModelConfig  # lazy: the model is not a dependency of config
    m = ModelConfig.preset(config.model.preset)
    return {"num_hidden_layers": m.num_layers, "vocab_size": m.vocab_size,
            "max_position_embeddings": m.max_position_embeddings}


def resolve_num_layers(config: ml_collections.ConfigDict) -> int | None:
    """Blocks of the configured model: from hf_path's config.json, else the built-in preset.

    None when it cannot be known here (no config.json on disk, or the model package is not
    importable), so validation skips the tap-layer range check instead of failing.
    """
    try:
        d = _model_dims(config)
    except ImportError:
        return None
    n = None if d is None else d.get("num_hidden_layers")
    return int(n) if n is not None else None


def resolve_model_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
    """vocab_size / max_position_embeddings of the configured model ({} when unknown here)."""
    keys = ("vocab_size", "max_position_embeddings")
    try:
        d = _model_dims(config) or {}
        d = d.get("text_config", d) if "vocab_size" not in d else d
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        return {}
    return {k: int(d[k]) for k in keys if isinstance(d.get(k), int)}


def _check_model_fit(c: Checker, config: ml_collections.ConfigDict) -> None:
    """Settings that only fail against the model's sizes (late, inside the sampler) before."""
    sizes = resolve_model_sizes(config)
    top_k, vocab = c.get("sampler.top_k"), sizes.get("vocab_size")
    if isinstance(top_k, int) and vocab and top_k > vocab:
        c.bad(f"sampler.top_k={top_k} exceeds the model's vocabulary ({vocab} tokens)")
    opsd_k = c.valid.get("rl.opsd_top_k")
    if opsd_k and vocab and opsd_k > vocab:
        c.bad(f"rl.opsd_top_k={opsd_k} exceeds the model's vocabulary ({vocab} tokens)")
    # Hugging Face models only: base.py's paper budgets on the tiny preset (512 positions) are
    # refused by the Sampler when built, still before anything compiles.
    pos = sizes.get("max_position_embeddings") if config.model.get("hf_path") else None
    prompt, new = c.get("data.max_prompt_len"), c.get("sampler.max_new_tokens")
    if isinstance(prompt, int) and isinstance(new, int) and pos and prompt + new > pos:
        c.bad(f"data.max_prompt_len + sampler.max_new_tokens = {prompt} + {new} = {prompt + new} tokens exceed "
              f"the model's max_position_embeddings={pos}")


def validate(config: ml_collections.ConfigDict, *, num_layers: int | None = None,
             num_devices: int | None = None, check_paths: bool = True) -> None:
    """Raise ConfigError listing every invalid field of `config`.

    num_layers: decoder blocks of the model (tap-layer range); None = resolve from the config
      (hf_path's config.json or the preset) when possible.
    num_devices: devices of the mesh (mesh-shape product, batch divisibility); None = skip.
    check_paths: whether model/data files and folders must exist (False for shipped paper
      configs, whose paths are placeholders).

    One function per section, in this order; a check across sections reads the fields it
    needs from `Checker.valid` (set only when a field passed its own check), so a bad
    field is reported once, by its own section.
    """
    c = Checker(config)
    _check_model(c, check_paths)
    _check_mesh(c, num_devices)
    _check_data(c, check_paths)
    _check_sampler(c)
    _check_rl(c)
    _check_micro_batch(c)
    _check_algorithm(c, num_layers)
    _check_optim(c)
    _check_train(c)
    if check_paths:  # without, the model (hf_path or preset) may be a placeholder
        _check_model_fit(c, config)
    if c.problems:
        raise ConfigError(c.problems)


def _check_model(c: Checker, check_paths: bool) -> None:
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


def _check_mesh(c: Checker, num_devices: int | None) -> None:
    """The mesh shapes and the sampler batch layout over the sampler mesh."""
    if c.get("mesh.shape") is None:  # tuple(None) failed deep in the trainer
        c.bad(f"mesh.shape is None: give {len(MESH_AXES)} integers {MESH_AXES}, e.g. (1, -1, 1)")
    train_mesh = c.mesh_shape("mesh.shape", num_devices)
    sampler_mesh = train_mesh
    if c.get("mesh.sampler_shape") is not None:
        sampler_mesh = c.mesh_shape("mesh.sampler_shape", num_devices)
    batch = c.number("sampler.batch_size", ge=1, integer=True)
    n = c.number("sampler.n", ge=1, integer=True)
    if sampler_mesh and batch and n and (batch * n) % (sampler_mesh[0] * sampler_mesh[1]):
        c.bad(f"sampler.batch_size * sampler.n = {batch * n} rollouts are not divisible by the "
              f"sampler mesh's data x fsdp = {sampler_mesh[0] * sampler_mesh[1]} devices")


def _check_data(c: Checker, check_paths: bool) -> None:
    fmt = c.choice("data.format", DATA_FORMATS)
    sol = c.get("data.solution_field")
    if sol is not MISSING and sol is not None and (not isinstance(sol, str) or not sol):
        c.bad(f"data.solution_field={sol!r} must be a dotted field path or None (None: the answer field)")
    tmpl = c.get("data.teacher_template")
    if tmpl is not MISSING and (not isinstance(tmpl, str) or "{problem}" not in tmpl or "{solution}" not in tmpl):
        c.bad("data.teacher_template must be a string containing {problem} and {solution}")
    c.number("data.teacher_max_prompt_len", ge=1, integer=True)
    prompt_f, question_f = c.get("data.prompt_field"), c.get("data.question_field")
    if bool(prompt_f) == bool(question_f):
        c.bad(f"data.prompt_field={prompt_f!r} and data.question_field={question_f!r}: set "
              "exactly one (chat-message prompts, or plain questions)")
    for f in ("answer_field", "system_prompt"):
        v = c.get(f"data.{f}")
        if v is not MISSING and not isinstance(v, str) and not (f == "system_prompt" and v is None):
            c.bad(f"data.{f}={v!r} must be a string")
    c.number("data.max_prompt_len", ge=1, integer=True)
    c.choice("data.truncation", TRUNCATIONS)
    c.choice("data.on_bad_row", BAD_ROW_POLICIES)
    c.number("data.seed", integer=True)
    if fmt in _SUFFIXES:
        _check_train_file(c, fmt, check_paths)
    if fmt == "synthetic":
        _check_synthetic(c)
    _check_eval_sets(c, fmt, check_paths)


def _check_train_file(c: Checker, fmt: str, check_paths: bool) -> None:
    train_path = c.get("data.train_path")
    if train_path is MISSING:
        pass
    elif not train_path:
        c.bad(f"data.train_path is required for data.format={fmt!r}")
    elif not str(train_path).endswith(_SUFFIXES[fmt]):
        c.bad(f"data.train_path={train_path!r} does not end with {_SUFFIXES[fmt]} "
              f"(data.format={fmt!r})")
    elif check_paths:
        c.path_exists("data.train_path", directory=False)
    if not _real_tokenizer(c):
        c.bad(f"data.format={fmt!r} needs a real tokenizer: set model.hf_path or "
              "model.tokenizer_path (the synthetic tokenizer only covers the synthetic task)")


def _real_tokenizer(c: Checker) -> bool:
    """Whether the run names a tokenizer of its own (else the synthetic one, which spells only
    the arithmetic task's characters and a few words)."""
    return c.get("model.hf_path") is not None or c.get("model.tokenizer_path") is not None


def _check_synthetic(c: Checker) -> None:
    c.number("data.synthetic.digits", ge=1, integer=True)
    c.number("data.synthetic.num_terms", ge=2, integer=True)
    c.number("data.synthetic.num_eval", ge=1, integer=True)
    c.boolean("data.synthetic.reasoning")
    sp = c.get("data.synthetic.system_prompt")
    if sp is not MISSING and sp is not None and not isinstance(sp, str):
        c.bad(f"data.synthetic.system_prompt={sp!r} must be a string or None")
    shots = c.number("data.synthetic.few_shot", ge=0, integer=True)
    if shots and not _real_tokenizer(c):
        c.bad(f"data.synthetic.few_shot={shots} writes its examples in prose, which the synthetic "
              "tokenizer cannot spell: set model.hf_path or model.tokenizer_path, or few_shot=0")
    ops = c.get("data.synthetic.ops")
    if not isinstance(ops, str) or not ops or set(ops) - set(SYNTHETIC_OPS):
        c.bad(f"data.synthetic.ops={ops!r} must be a non-empty string of {SYNTHETIC_OPS!r}")
    prose = c.choice("data.synthetic.prose", SYNTHETIC_PROSE)
    if prose == "running_total" and isinstance(ops, str) and "*" in ops:
        c.bad(f"data.synthetic.prose='running_total' works left to right, which is the order of "
              f"operations only without '*': data.synthetic.ops={ops!r} (use '+', '-' or '+-', or prose='brief')")


def _check_eval_sets(c: Checker, fmt: str | None, check_paths: bool) -> None:
    eval_sets = c.get("data.eval_sets")
    if eval_sets is None:
        c.bad("data.eval_sets is None: give a (possibly empty) mapping name -> {path, k}")
    for name in (eval_sets.keys() if isinstance(eval_sets, (Mapping, ml_collections.ConfigDict)) else ()):
        base = f"data.eval_sets.{name}"
        c.number(f"{base}.k", ge=1, integer=True)
        path = c.get(f"{base}.path")
        if path is MISSING:
            continue
        if path is None:
            if fmt in _SUFFIXES:
                c.bad(f"{base}.path is None: only the synthetic task has built-in eval problems")
        elif not str(path).endswith(_SUFFIXES["parquet"] + _SUFFIXES["jsonl"]):
            c.bad(f"{base}.path={path!r} must be a .parquet or .jsonl file")
        elif check_paths:
            c.path_exists(f"{base}.path", directory=False)


def _check_sampler(c: Checker) -> None:
    c.number("sampler.max_new_tokens", ge=1, integer=True)
    c.number("sampler.temperature", gt=0)
    c.number("sampler.top_p", gt=0, le=1)
    c.number("sampler.top_k", ge=0, integer=True)
    c.number("sampler.prompt_bucket", ge=1, integer=True)
    c.choice("sampler.kv_dtype", COMPUTE_DTYPES)
    c.boolean("sampler.keep_cache")
    c.number("sampler.decode_segments", ge=1, integer=True, optional=True)
    c.choice("sampler.engine", SAMPLER_ENGINES)
    c.number("sampler.slots", ge=1, integer=True)
    c.number("sampler.page_size", ge=1, integer=True)
    c.number("sampler.pool_pages", ge=1, integer=True, optional=True)
    c.choice("sampler.paged_impl", PAGED_IMPLS)


def _check_rl(c: Checker) -> None:
    """The rl fields one at a time (the algorithm's needs: _check_algorithm)."""
    c.choice("rl.algorithm", ALGORITHMS)
    if c.get("rl.adv_estimator") is not None:
        c.choice("rl.adv_estimator", ADV_ESTIMATORS)
    c.number("rl.clip_low", ge=0, lt=1)
    c.number("rl.clip_high", ge=0)
    c.number("rl.dual_clip", gt=1)
    c.number("rl.ratio_log_clamp", gt=0)
    if c.get("rl.loss_agg") is not None:
        c.choice("rl.loss_agg", LOSS_AGGS)
    c.number("rl.kl_coef", ge=0)
    c.choice("rl.kl_type", KL_TYPES)
    c.number("rl.pg_weight", ge=0, optional=True)
    c.number("rl.opsd_weight", ge=0, optional=True)
    c.number("rl.opsd_beta", ge=0, le=1)
    c.number("rl.opsd_token_clip", ge=0)
    c.number("rl.opsd_top_k", ge=0, integer=True)
    c.choice("rl.teacher", TEACHERS)
    c.number("rl.teacher_decay", gt=0, lt=1)
    c.number("rl.entropy_coef", ge=0)
    c.number("rl.think_weight", ge=0)
    c.number("rl.attn_weight", ge=0)
    c.number("rl.tau", gt=0)
    c.number("rl.adv_clip", gt=0)
    c.choice("rl.think_weight_mode", THINK_WEIGHT_MODES)
    c.number("rl.ogls_alpha", gt=0)
    c.choice("rl.ogls_unit", OGLS_UNITS)
    c.choice("rl.ogls_divergence", OGLS_DIVERGENCES)
    c.boolean("rl.lens_norm")
    c.boolean("rl.bupo_lens_norm")
    for f in ("attn_steps", "attn_window", "attn_stride", "logit_chunk", "ppo_epochs"):
        c.number(f"rl.{f}", ge=1, integer=True)
    c.number("rl.bupo_steps", ge=0, integer=True)


def _check_micro_batch(c: Checker) -> None:
    """A micro-batch holds at least one whole sequence (prompt + response budget)."""
    mbt = c.number("rl.micro_batch_tokens", ge=1, integer=True)
    max_prompt, max_new = c.valid.get("data.max_prompt_len"), c.valid.get("sampler.max_new_tokens")
    if mbt and max_prompt and max_new and mbt < max_prompt + max_new:
        c.bad(f"rl.micro_batch_tokens={mbt} is smaller than one sequence (data.max_prompt_len + "
              f"sampler.max_new_tokens = {max_prompt + max_new})")


def _check_algorithm(c: Checker, num_layers: int | None) -> None:
    """What rl.algorithm needs: a student layer in range, its weights on."""
    algo = c.valid.get("rl.algorithm")
    if algo is None:
        return
    _, uses_think, uses_attn, uses_bupo = _ALGORITHM_TABLE[algo]
    metrics = c.boolean("rl.oisd_metrics")
    if uses_think or uses_attn or uses_bupo or metrics is True:
        why = f"rl.algorithm={algo!r}" if uses_think or uses_attn or uses_bupo else "rl.oisd_metrics=True"
        _check_tap_layer(c, why, num_layers)
    think, attn = c.valid.get("rl.think_weight"), c.valid.get("rl.attn_weight")
    if algo == "oisd_think_only" and think == 0:
        c.bad("rl.think_weight must be > 0 for rl.algorithm='oisd_think_only'")
    if algo == "oisd_attn_only" and attn == 0:
        c.bad("rl.attn_weight must be > 0 for rl.algorithm='oisd_attn_only'")
    if algo == "oisd" and think == 0 and attn == 0:
        logging.warning("rl.algorithm='oisd' with both weights 0 is plain GRPO")
    if algo == "bupo" and c.get("rl.bupo_steps") == 0:
        c.bad("rl.bupo_steps must be > 0 for rl.algorithm='bupo' (0 is plain GRPO)")
    _check_teacher(c, algo)


def _check_teacher(c: Checker, algo: str) -> None:
    """OPSD's weight and teacher, and the KL's reference (the frozen initial weights)."""
    opsd = c.valid.get("rl.opsd_weight")
    opsd = (1.0 if algo in _TEACHER_ALGORITHMS else 0.0) if opsd is None else opsd
    if algo in _TEACHER_ALGORITHMS and opsd == 0:
        c.bad(f"rl.opsd_weight must be > 0 (or None) for rl.algorithm={algo!r}")
    if algo == "bupo" and opsd > 0:
        c.bad(f"rl.opsd_weight={opsd} does not combine with rl.algorithm='bupo' (the internal-policy phase)")
    kl, teacher = c.valid.get("rl.kl_coef"), c.valid.get("rl.teacher")
    if kl and teacher and teacher != "frozen":
        c.bad(f"rl.kl_coef={kl} needs rl.teacher='frozen' (the KL is to the initial policy), got {teacher!r}")


def _check_tap_layer(c: Checker, why: str, num_layers: int | None) -> None:
    if num_layers is None:
        try:
            num_layers = resolve_num_layers(c.config)
        except (ValueError, KeyError, OSError) as e:
            c.bad(f"model: cannot resolve the number of layers ({e})")
    tap = c.get("rl.tap_layer")
    if tap is None:
        c.bad(f"rl.tap_layer must be set for {why} (the student layer)")
    elif isinstance(tap, bool) or not isinstance(tap, int):
        c.bad(f"rl.tap_layer={tap!r} must be an integer")
    elif num_layers is not None and not 1 <= tap <= num_layers - 1:
        c.bad(f"rl.tap_layer={tap} is out of range 1..{num_layers - 1} for a "
              f"{num_layers}-layer model")
    elif tap < 1:
        c.bad(f"rl.tap_layer={tap} must be >= 1")


def _check_optim(c: Checker) -> None:
    # lr >= 1 (AdamW steps of ~lr per weight) destroys any model; 1e30 passed before
    c.number("optim.lr", gt=0, lt=1)
    c.number("optim.b1", ge=0, lt=1)
    c.number("optim.b2", ge=0, lt=1)
    c.number("optim.eps", gt=0)
    c.number("optim.weight_decay", ge=0)
    c.number("optim.grad_clip", ge=0)
    c.boolean("optim.skip_nonfinite")
    c.choice("optim.schedule", SCHEDULES)
    c.number("optim.warmup_steps", ge=0, integer=True)
    c.number("optim.end_lr_factor", ge=0, le=1)


def _check_train(c: Checker) -> None:
    c.number("train.steps", ge=1, integer=True)
    pps = c.number("train.prompts_per_step", ge=1, integer=True)
    mbp = c.number("train.mini_batch_prompts", ge=1, integer=True)
    if pps and mbp and pps % mbp:
        c.bad(f"train.prompts_per_step={pps} is not divisible by train.mini_batch_prompts={mbp}")
    c.number("train.seed", integer=True)
    for f in ("sft_warmup_steps", "eval_every", "eval_prompts", "checkpoint_every", "log_samples"):
        c.number(f"train.{f}", ge=0, integer=True)
    for f in ("sft_batch_size", "log_every", "keep_checkpoints", "reward_workers"):
        c.number(f"train.{f}", ge=1, integer=True)
    c.number("train.sft_lr", gt=0, lt=1)
    c.number("train.max_skipped_updates", ge=0, integer=True)
    c.boolean("train.allow_config_change")
    warm, steps, epochs = c.get("optim.warmup_steps"), c.get("train.steps"), c.get("rl.ppo_epochs")
    if all(isinstance(v, int) and v > 0 for v in (warm, steps, epochs, pps, mbp)) and pps % mbp == 0:
        updates = steps * (pps // mbp) * epochs
        if warm >= updates:
            c.bad(f"optim.warmup_steps={warm} >= the run's {updates} optimizer updates (train.steps x "
                  "train.prompts_per_step / train.mini_batch_prompts x rl.ppo_epochs): lr never reaches optim.lr")
    c.number("train.reward_timeout_s", gt=0)
    c.boolean("train.async_checkpoint")
    c.choice("train.reward", REWARDS)
