"""Resuming a workdir with another experiment's config is refused, with the differences.

A rerun on the same --workdir resumes from its newest checkpoint; with a changed model,
algorithm or data stream that silently continues one run as another (the data iterator
already refuses a different record set or seed; this covers the rest: the prompt limit,
the template fields, the loss). `train.allow_config_change=True` resumes anyway.
Performance knobs that leave the math alone (micro-batch size, logit chunk, dtypes of the
sampler cache) and the `train`/`optim` schedule fields may change freely.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from oisd_jax.cli import UserError

GUARDED = ("model.hf_path", "model.preset", "model.tokenizer_path", "rl.", "data.")
FREE = ("rl.micro_batch_tokens", "rl.logit_chunk", "data.eval_sets.")


class ConfigChanged(UserError):
    """The config differs from the one the workdir's checkpoint was trained with."""


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: Mapping[str, Any] | None, config) -> list[str]:
    """'field: saved -> now' for every guarded field that differs (none when nothing was saved)."""
    if not saved:
        return []
    now = _flat(json.loads(config.to_json_best_effort()))
    was = _flat(saved)
    keys = [k for k in sorted(set(now) | set(was)) if k.startswith(GUARDED) and not k.startswith(FREE)]
    return [f"{k}: {was.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in keys
            if was.get(k, now.get(k)) != now.get(k, was.get(k))]


def check_resume(saved: Mapping[str, Any] | None, config, where: str) -> None:
    """Raise ConfigChanged listing the differences unless train.allow_config_change."""
    changes = config_changes(saved, config)
    if changes and not bool(config.train.allow_config_change):
        raise ConfigChanged(f"resuming {where} with a changed config (saved -> now): {'; '.join(changes)}. "
                            "Use another --workdir, or --config.train.allow_config_change=True to resume anyway")
