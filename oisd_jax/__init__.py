"""oisd_jax: GRPO + OISD post-training of Qwen3 / Llama models in JAX (docs/design.md)."""
from oisd_jax import startup as _startup

# Before any submodule imports jax: filter the start-up chatter that is harmless here (see startup.py).
_startup.quiet_import_jax()
