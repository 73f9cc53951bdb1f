"""The decoder: config, params, forward with taps, KV-cache decoding, Hugging Face I/O."""
from oisd_jax.model.config import ModelConfig
from oisd_jax.model.decode import KVCache, decode_step, init_cache, prefill
from oisd_jax.model.decoder import (ForwardOut, Taps, final_norm, forward, logit_lens, logits, rms_norm,
                                    unembed)
from oisd_jax.model.hf_io import CheckpointError, load_hf, save_hf
from oisd_jax.model.params import (Layers, Params, abstract, cast, init_params, logical_axes, param_specs,
                                   shape_mismatch)

__all__ = ["ModelConfig", "ForwardOut", "Taps", "final_norm", "forward", "logit_lens", "logits", "rms_norm",
           "unembed", "CheckpointError", "load_hf", "save_hf", "Layers", "Params", "abstract", "cast",
           "init_params", "logical_axes", "param_specs", "shape_mismatch", "KVCache", "decode_step", "init_cache", "prefill"]
