"""A real read-only and a real full filesystem under the trainer's CLI (issue 16).

test_reliability.py injects the OSErrors; here the kernel raises them. A private mount
namespace (`unshare -rm`, no privileges needed where user namespaces are enabled) holds a
small tmpfs: a first run saves checkpoint 1 there, then the same folder is remounted
read-only, then filled up to the last 256 KiB. Each rerun must stop with one `error:` line
(exit 2, no traceback, no hang) and leave checkpoint 1 and its metrics line as they were.
Skipped where `unshare -rm` or tmpfs mounts are not allowed (some CI sandboxes).
"""
import hashlib
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from oisd_jax import cli
from oisd_jax.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TINY = [  # tests/tiny_run.py's seconds-long run, as CLI flags; async checkpoints (the default)
    "--config=configs/tiny.py", "--config.train.sft_warmup_steps=1", "--config.train.sft_batch_size=8",
    "--config.train.prompts_per_step=4", "--config.train.mini_batch_prompts=4", "--config.train.eval_every=0",
    "--config.train.checkpoint_every=1", "--config.train.reward=strict", "--config.train.reward_workers=1",
    "--config.sampler.n=2", "--config.sampler.batch_size=4", "--config.sampler.max_new_tokens=8", "--config.data.synthetic.reasoning=False",
    "--config.sampler.prompt_bucket=8", "--config.data.max_prompt_len=24"]


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return False
    p = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"],
                       capture_output=True)
    return p.returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_work(), reason="no unshare -rm / tmpfs mounts here")


def _tree_digest(folder) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(folder) for f in files}


def _error_lines(path) -> list[str]:
    """The `error:` line and the line after it; asserts there is exactly one and no traceback."""
    lines = open(path).read().splitlines()
    assert not any("Traceback (most recent call last)" in ln for ln in lines), "\n".join(lines[-40:])
    at = [i for i, ln in enumerate(lines) if ln.startswith("error: ")]
    assert len(at) == 1, "\n".join(lines[-40:])
    return lines[at[0]:at[0] + 2]


def test_read_only_and_full_filesystem_stop_with_one_line_and_keep_what_was_saved(tmp_path):
    fs, out = tmp_path / "fs", tmp_path / "out"
    fs.mkdir()
    out.mkdir()
    train = f"{sys.executable} -m oisd_jax.train {' '.join(_TINY)} --workdir={fs}/w"
    script = f"""set -u
mount -t tmpfs -o size=64m tmpfs {fs}
{train} --config.train.steps=1 >/dev/null 2>{out}/a.err; echo $? > {out}/a.rc
cp -a {fs}/w {out}/after_a
mount -o remount,ro {fs}
timeout 300 {train} --config.train.steps=2 >/dev/null 2>{out}/ro.err; echo $? > {out}/ro.rc
mount -o remount,rw {fs}
dd if=/dev/zero of={fs}/filler bs=64k 2>/dev/null; truncate -s -256K {fs}/filler
df -k {fs} > {out}/df
timeout 300 {train} --config.train.steps=2 >/dev/null 2>{out}/full.err; echo $? > {out}/full.rc
rm {fs}/filler
cp -a {fs}/w {out}/after_full
"""
    env = dict(os.environ)
    env.pop("OISD_DEBUG", None)
    subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=env, timeout=900, check=True)
    rc = {k: int((out / f"{k}.rc").read_text()) for k in ("a", "ro", "full")}
    assert rc["a"] == 0, (out / "a.err").read_text()[-3000:]
    saved = _tree_digest(out / "after_a" / "checkpoints" / "1")
    metrics_a = (out / "after_a" / "metrics.jsonl").read_text()
    # read-only: refused before anything is built, naming the folder and the kernel's reason
    assert rc["ro"] == 2, (out / "ro.err").read_text()[-3000:]
    err = _error_lines(out / "ro.err")
    assert err == [f"error: checkpoint folder {fs}/w/checkpoints is not writable (Read-only file system); "
                   "nothing would be saved", cli.HINT], err
    # full: step 2 trains, its (async) save hits ENOSPC: one line naming the step, exit 2, no hang
    assert rc["full"] == 2, (out / "full.err").read_text()[-3000:]
    err = _error_lines(out / "full.err")
    assert err[1] == cli.HINT and "No space left on device" in err[0], err
    assert "checkpoint" in err[0] and f"{fs}/w/checkpoints" in err[0], err
    # nothing already saved is lost: checkpoint 1 byte for byte, its metrics line, and it restores
    after = out / "after_full"
    assert _tree_digest(after / "checkpoints" / "1") == saved
    assert (after / "metrics.jsonl").read_text().startswith(metrics_a)
    assert not (after / "checkpoints" / "2").exists()
    with Checkpointer(after / "checkpoints", async_save=False) as ck:
        restored = ck.restore()
        assert restored.step == 1 and ck.all_steps() == [1]
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state))
