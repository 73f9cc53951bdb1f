"""The issue-16 table: bad inputs fed to the real CLIs, each outcome classified.

    python bench/reliability_table.py [--root=DIR] [--json=bench/results/reliability.json]

Runs every case of CORPUS as `python -m oisd_jax.<cli> ...` in `--root` (default: this
checkout; point it at an older checkout for the "before" column) and sorts the outcome:
  clear      exit code != 0, at most 2 stderr lines (message + hint; absl log lines of
             libraries such as orbax's are not counted), no traceback
  traceback  exit code != 0 with a Python traceback, or a message longer than 2 lines
  hang       still running after --timeout seconds while refusing (no progress line)
  silent     exit code 0, or still training after --timeout s: the bad input was accepted
Each case costs one interpreter start (jax import, ~2-4 s on a laptop core).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

TINY = "configs/tiny.py"
_CONFIG_ARGS = [
    "nosuch", "rl.nosuch=1", "optim.nosuch.deep=1", "optim.lr=1e30", "optim.lr=1.0", "optim.lr=1e999",
    "optim.lr=-1e-3", "optim.lr='fast'", "train.sft_lr=3.0", "optim.b1=1.0", "optim.schedule='linear'",
    "optim.end_lr_factor=2.0", "optim.warmup_steps=100000", "sampler.top_k=100", "sampler.top_k=-1",
    "sampler.top_p=0.0", "sampler.temperature=0.0", "sampler.n=0", "mesh.shape=(2,1,1)",
    "data.truncation='sideways'", "data.on_bad_row='ignore'", "data.format='csv'", "data.format='jsonl'",
    "data.format='parquet',data.train_path='x.csv'", "data.max_prompt_len=0", "rl.tap_layer=9",
    "rl.tap_layer=0", "rl.clip_low=1.5", "rl.micro_batch_tokens=8", "mesh.shape=(3,-1,1)", "train.steps=0",
    "train.prompts_per_step=5", "train.reward='exact'", "train.reward_workers=0",
    "train.init_from_hf='/nonexistent'", "model.preset=None", "model.dtype='int8'",
]
CORPUS: list[tuple[str, list[str]]] = [
    *[(f"train :{a}", ["oisd_jax.train", f"--config={TINY}:{a}", "--workdir={tmp}/w"]) for a in _CONFIG_ARGS],
    ("train --config.optim.learning_rate", ["oisd_jax.train", f"--config={TINY}", "--config.optim.learning_rate=1",
                                            "--workdir={tmp}/w"]),
    ("train --config.sampler.top_k=abc", ["oisd_jax.train", f"--config={TINY}", "--config.sampler.top_k=abc",
                                          "--workdir={tmp}/w"]),
    ("train missing config file", ["oisd_jax.train", "--config=configs/nope.py", "--workdir={tmp}/w"]),
    ("train workdir under a file", ["oisd_jax.train", f"--config={TINY}", "--workdir={tmp}/file/w"]),
    ("train init_from_hf flag missing", ["oisd_jax.train", f"--config={TINY}", "--init_from_hf=/nonexistent",
                                         "--workdir={tmp}/w"]),
    ("export missing workdir", ["oisd_jax.export", "--workdir=/nonexistent", "--out={tmp}/o"]),
    ("export no flags", ["oisd_jax.export"]),
    ("export empty workdir", ["oisd_jax.export", "--workdir={tmp}", "--out={tmp}/o"]),
    ("evaluate no flags", ["oisd_jax.evaluate"]),
    ("evaluate missing workdir", ["oisd_jax.evaluate", "--workdir=/nonexistent"]),
    ("evaluate --hf without config", ["oisd_jax.evaluate", "--hf={tmp}"]),
    ("evaluate --hf not a model", ["oisd_jax.evaluate", "--hf={tmp}", f"--config={TINY}"]),
    ("analyze no flags", ["oisd_jax.analyze"]),
    ("analyze missing workdir", ["oisd_jax.analyze", "--workdir={tmp}/missing"]),  # old code made its analysis/
    ("plan bad arg", ["oisd_jax.plan", f"--config={TINY}:nosuch", "--devices=1", "--target=cpu"]),
    ("plan missing config", ["oisd_jax.plan", "--config=configs/nope.py", "--devices=1", "--target=cpu"]),
    ("plan unknown target", ["oisd_jax.plan", f"--config={TINY}", "--devices=1", "--target=tpu9"]),
]
# A real read-only and a real full filesystem: a tmpfs in a private mount namespace
# (`unshare -rm`; the cases are left out, and say so, where that is not allowed).
_QUICK = ["--config.train.sft_warmup_steps=1", "--config.train.sft_batch_size=8", "--config.train.steps=2",
          "--config.train.prompts_per_step=4", "--config.train.mini_batch_prompts=4", "--config.train.eval_every=0",
          "--config.train.checkpoint_every=1", "--config.train.reward=strict", "--config.train.reward_workers=1",
          "--config.sampler.n=2", "--config.sampler.batch_size=4", "--config.sampler.max_new_tokens=8",
          "--config.sampler.prompt_bucket=8", "--config.data.max_prompt_len=24"]
NS_CORPUS: list[tuple[str, str, list[str]]] = [  # (name, shell set-up inside the namespace, CLI)
    ("train read-only workdir (tmpfs)", "mkdir -p {tmp}/ro && mount -t tmpfs tmpfs {tmp}/ro && mkdir {tmp}/ro/w "
     "&& mount -o remount,ro {tmp}/ro", ["oisd_jax.train", f"--config={TINY}", *_QUICK, "--workdir={tmp}/ro/w"]),
    ("train full disk (64 KiB free tmpfs)", "mkdir -p {tmp}/full && mount -t tmpfs -o size=4m tmpfs {tmp}/full && "
     "(dd if=/dev/zero of={tmp}/full/filler bs=64k 2>/dev/null; truncate -s -64K {tmp}/full/filler)",
     ["oisd_jax.train", f"--config={TINY}", *_QUICK, "--workdir={tmp}/full/w"]),
    ("export --out on a full disk", "mkdir -p {tmp}/fo && mount -t tmpfs -o size=64k tmpfs {tmp}/fo",
     ["oisd_jax.export", "--workdir={run}", "--out={tmp}/fo/o"]),
]


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} oisd_jax")


def classify(rc: int | None, stderr: str) -> str:
    # absl/glog log lines ("W1201 12:00:00.0 ... checkpoint_manager.py:452] ...") are library
    # chatter, not the message, and so are the trainer's own timestamped log lines and progress
    # bars (a case that trains before it fails); everything else on stderr counts
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not re.match(r"^[IWE]\d{4} ", ln)
             and not ln.startswith("WARNING: All log messages") and not _LOG_LINE.match(ln) and "%|" not in ln]
    tb = any("Traceback (most recent call last)" in ln for ln in lines)
    if rc is None:
        return "silent" if "train" in stderr or "it/s" in stderr else "hang"
    if rc == 0:
        return "silent"
    if tb or len([ln for ln in lines if not ln.startswith("Pass --helpshort")]) > 2:
        return "traceback"
    return "clear"


def namespaces_work() -> bool:
    p = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"],
                       capture_output=True)
    return p.returncode == 0


def run_case(root: str, args: list[str], tmp: str, timeout: float, setup: str | None = None,
             run: str = "") -> tuple[str, int | None, str]:
    args = [a.replace("{tmp}", tmp).replace("{run}", run) for a in args]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    env.pop("OISD_DEBUG", None)
    cmd = [sys.executable, "-m", *args]
    if setup is not None:  # inside a private mount namespace, after `setup`
        cmd = ["unshare", "-rm", "sh", "-c", f"{setup.replace('{tmp}', tmp)} && exec {shlex.join(cmd)}"]
    try:
        p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=timeout)
        return classify(p.returncode, p.stderr), p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return classify(None, err), None, err


def _tiny_run(root: str, tmp: str) -> str:
    """A finished 2-step tiny run (for the export cases)."""
    run = os.path.join(tmp, "tiny_run")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    subprocess.run([sys.executable, "-m", "oisd_jax.train", f"--config={TINY}", *_QUICK, f"--workdir={run}"],
                   cwd=root, env=env, check=True, capture_output=True)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--train_timeout", type=float, default=300.0, help="cases that train a few tiny steps")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "reliability.json"))
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        open(os.path.join(tmp, "file"), "w").close()
        cases = [(n, None, args, a.timeout) for n, args in CORPUS]
        if namespaces_work():
            cases += [(n, setup, args, a.train_timeout) for n, setup, args in NS_CORPUS]
        else:
            print(f"(left out: {len(NS_CORPUS)} filesystem cases; `unshare -rm` + tmpfs are not allowed here)")
        cases = [c for c in cases if a.only in c[0]]
        run = _tiny_run(a.root, tmp) if any("{run}" in " ".join(c[2]) for c in cases) else ""
        for name, setup, args, timeout in cases:
            kind, rc, err = run_case(a.root, args, tmp, timeout, setup, run)
            last = [ln for ln in err.splitlines() if ln.strip()][-1:] or [""]
            results[name] = {"class": kind, "rc": rc, "stderr_lines": len(err.splitlines()), "last": last[0][:200]}
            print(f"{kind:<10} rc={rc!s:<5} {name}", flush=True)
    counts = collections.Counter(r["class"] for r in results.values())
    print(f"\ntried {len(results)}: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("clear", "traceback", "hang", "silent")))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"root": a.root, "counts": counts, "cases": results}, f, indent=1)


if __name__ == "__main__":
    main()
