"""Tiny random transformers checkpoints, built and saved by the tests themselves."""
from __future__ import annotations

import os

import torch
import transformers

QWEN3 = dict(model_type="qwen3", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
             tie_word_embeddings=True, max_position_embeddings=256, rms_norm_eps=1e-6, eos_token_id=1,
             bos_token_id=0)
LLAMA = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
             num_attention_heads=8, num_key_value_heads=2, head_dim=8, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
             tie_word_embeddings=False, max_position_embeddings=256, rms_norm_eps=1e-5,
             eos_token_id=[1, 2], bos_token_id=0)


def make_hf_model(kind: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random-init model with a large init range and random norm weights (ones hide bugs)."""
    spec = dict(QWEN3 if kind == "qwen3" else LLAMA, **overrides)
    cfg = transformers.AutoConfig.for_model(**spec, initializer_range=0.1)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def save_hf_model(kind: str, path: str | os.PathLike, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    model = make_hf_model(kind, seed, **overrides)
    model.save_pretrained(path)
    return model
