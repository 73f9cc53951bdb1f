"""A training checkpoint as a Hugging Face folder: `python -m oisd_jax.export --workdir=RUN --out=DIR`.

The folder holds config.json, safetensors (through `oisd_jax.model.save_hf`), the run's
tokenizer files and a generation_config.json, so `transformers.AutoModelForCausalLM` /
`AutoTokenizer.from_pretrained(DIR)` load it. The run's tokenizer is the synthetic one when
`data.format == 'synthetic'` and `model.tokenizer_path` is unset, else the tokenizer folder
of `model.tokenizer_path or model.hf_path` (the same rule as the trainer's: both come from
`oisd_jax.run_files`).
"""
from __future__ import annotations

import logging
import os

from absl import app, flags

from oisd_jax import distributed
from oisd_jax.cli import UserError
from oisd_jax.model import save_hf
from oisd_jax.run_files import Run, load_run

log = logging.getLogger("oisd_jax.export")


# ----------------------------------------------------------------------------- export
def prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse a non-empty `out_dir` unless `overwrite`; then drop its old weights.

    Old shards or an old index left beside new weights made our loader read the old
    model while transformers read the new one.
    """
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not overwrite:
        shown = sorted(os.listdir(out_dir))
        raise UserError(f"--out={out_dir} is not empty ({', '.join(shown[:4])}{', ...' if len(shown) > 4 else ''}); "
                        "pass --overwrite to replace the model in it")
    for fn in os.listdir(out_dir):
        if fn.endswith((".safetensors", ".safetensors.index.json", ".safetensors.tmp", ".bin", ".bin.index.json")):
            os.remove(os.path.join(out_dir, fn))


def export(workdir: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | None = None,
           dtype: str = "float32", config=None, overwrite: bool = False) -> str:
    """Write checkpoint `step` (None = newest) of a run as a Hugging Face folder; returns it.

    A non-empty `out_dir` is refused unless `overwrite` (then its old weight files go)."""
    out_dir = os.fspath(out_dir)
    if distributed.is_main():
        prepare_out_dir(out_dir, overwrite)
    run = load_run(workdir, step=step, config=config)
    cfg = run.model_cfg
    if cfg.bos_token_id is None and run.tokenizer.bos_token_id is not None:
        cfg = cfg.replace(bos_token_id=run.tokenizer.bos_token_id)  # presets leave it unset
    save_hf(cfg, run.params, out_dir, dtype=dtype)
    if distributed.is_main():
        run.tokenizer.save_pretrained(out_dir)
        _generation_config(run).save_pretrained(out_dir)
    log.info("exported %s to %s", run.source, out_dir)
    return out_dir


def _generation_config(run: Run):
    """EOS/BOS/PAD and the run's sampling settings, so `model.generate` behaves like rollouts."""
    from transformers import GenerationConfig
    eos = list(run.model_cfg.eos_token_ids)
    from oisd_jax.run_spec import resolve
    sp = resolve(run.config, num_devices=None, check_paths=False).sampler
    return GenerationConfig(
        bos_token_id=run.model_cfg.bos_token_id if run.model_cfg.bos_token_id is not None
        else run.tokenizer.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos, pad_token_id=run.tokenizer.pad_token_id,
        do_sample=True, temperature=sp.sampling.temperature, top_p=sp.sampling.top_p,
        top_k=sp.sampling.top_k or None, max_new_tokens=sp.max_new_tokens)


# ----------------------------------------------------------------------------- CLI
FLAGS = flags.FLAGS


def define_flags() -> None:
    # Defined only when run as a program: evaluate/analyze import this module.
    flags.DEFINE_string("workdir", None, "Run folder (or its checkpoints/ folder).")
    flags.DEFINE_string("out", None, "Output Hugging Face folder.")
    flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Dtype of the written weights.")
    flags.DEFINE_bool("overwrite", False, "Replace the model in a non-empty --out (its old weight files are removed).")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every handler at INFO
    if not FLAGS.workdir or not FLAGS.out:
        raise app.UsageError("--workdir and --out are required")
    print(export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype, overwrite=FLAGS.overwrite))


if __name__ == "__main__":
    define_flags()
    from oisd_jax import cli
    cli.run_absl(main)
