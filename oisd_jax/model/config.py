"""ModelConfig: the architecture of a Qwen3 or Llama 3.x decoder, plus how to run it.

Frozen and hashable so it can be a static argument of `jax.jit`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

FAMILIES = ("qwen3", "llama")
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")
ATTN_IMPLS = ("xla", "cudnn", "blocked", "splash")
_MODEL_TYPES = {"qwen3": "qwen3", "llama": "llama"}
_ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # llama3 rope scaling as sorted (key, value) pairs, hashable; None = plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # How to run (not architecture): compute dtype, master param dtype, remat, attention.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "nothing_saveable"
    attn_impl: str = "xla"
    attn_block_size: int = 512

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family={self.family!r}: supported {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}: supported {REMAT_POLICIES}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r}: supported {ATTN_IMPLS}")

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict, **overrides) -> "ModelConfig":
        """From a transformers config.json (a folder, the file, or its dict)."""
        if isinstance(path_or_dict, dict):
            d, where = path_or_dict, "config dict"
        else:
            p = os.fspath(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            if not os.path.exists(p):
                raise FileNotFoundError(f"no config.json at {p}")
            with open(p) as f:
                d = json.load(f)
            where = p
        mt = d.get("model_type")
        if mt not in _MODEL_TYPES:
            raise ValueError(f"{where}: model_type={mt!r} is not supported (supported: {sorted(_MODEL_TYPES)})")
        # transformers 5 nests rope settings in rope_parameters; 4.x uses rope_theta/rope_scaling.
        rope = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling") or {}
        rope.update({k: v for k, v in scaling.items()})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rtype = rope.pop("rope_type", rope.pop("type", "default")) or "default"
        if rtype not in _ROPE_TYPES:
            raise ValueError(f"{where}: rope type {rtype!r} is not supported (supported: {_ROPE_TYPES})")
        rope_scaling = None
        if rtype == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [k for k in keys if k not in rope]
            if missing:
                raise ValueError(f"{where}: llama3 rope scaling lacks {missing}")
            rope_scaling = tuple(sorted((k, float(rope[k])) for k in keys))
        eos = d.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        heads = d["num_attention_heads"]
        kw = dict(
            family=_MODEL_TYPES[mt], vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads, rope_theta=float(theta),
            rope_scaling=rope_scaling, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            eos_token_ids=eos, bos_token_id=d.get("bos_token_id"))
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError(f"{where}: attention_bias/mlp_bias are not supported")
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self, torch_dtype: str = "float32") -> dict:
        """A transformers config.json dict (readable by transformers 4.x and 5.x)."""
        arch = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[self.family]
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = dict(self.rope_scaling, rope_type="llama3")
            rope_scaling["original_max_position_embeddings"] = int(rope_scaling["original_max_position_embeddings"])
        eos = list(self.eos_token_ids)
        d = dict(
            architectures=[arch], model_type=self.family, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, hidden_act="silu",
            rope_theta=self.rope_theta, rope_scaling=rope_scaling, rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_embeddings, max_position_embeddings=self.max_position_embeddings,
            attention_bias=False, torch_dtype=torch_dtype,
            eos_token_id=(eos[0] if len(eos) == 1 else eos) if eos else None, bos_token_id=self.bos_token_id)
        if self.family == "llama":
            d["mlp_bias"] = False
        return d

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """Built-in shapes: 'tiny' (the embedded CPU default) and the paper's models."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r} (known: {sorted(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    "tiny": dict(family="qwen3", vocab_size=64, hidden_size=128, intermediate_size=384, num_layers=4,
                 num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10000.0, tie_embeddings=True,
                 max_position_embeddings=512),
    "qwen3_4b": dict(family="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6,
                     tie_embeddings=True, max_position_embeddings=40960, eos_token_ids=(151645, 151643)),
    "qwen3_8b": dict(family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6,
                     tie_embeddings=False, max_position_embeddings=40960, eos_token_ids=(151645, 151643)),
    # OctoThinker (Llama-3.2-3B / Llama-3.1-8B bases).
    "octothinker_3b": dict(family="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                           num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128, rope_theta=5e5,
                           rope_scaling=(("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                         ("original_max_position_embeddings", 8192.0)),
                           rms_norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=131072),
    "octothinker_8b": dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                           num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=5e5,
                           rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                         ("original_max_position_embeddings", 8192.0)),
                           rms_norm_eps=1e-5, tie_embeddings=False, max_position_embeddings=131072),
}
