"""Reliability (issue 16): every bad input ends in one clear line, nothing is lost or silently wrong.

A corpus of bad inputs (configs, data files, model folders, checkpoints, workdirs) each
asserting that the error reaches the CLI edge as a user error whose one line names the
thing; the ten findings of the issue each have a test here that failed before the fix;
a few subprocess runs check the real exit code and the absence of a traceback.
"""
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from oisd_jax import cli, run_files
from oisd_jax.checkpoint import Checkpointer
from oisd_jax.config import ConfigError, validate
from oisd_jax.config_files import load_config_file
from oisd_jax.divergence import DivergenceError, SkipGuard
from oisd_jax.workdir_lock import WorkdirLock, WorkdirLocked
from hf_fixtures import save_hf_model
from test_checkpoint import abstract_of, make_state
from tiny_run import config_leaf_fields, tiny_config, tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def user_error(fn, *args, **kw) -> str:
    """Run `fn`; it must raise an error the CLI prints as one line. Returns that line."""
    with pytest.raises(Exception) as info:
        fn(*args, **kw)
    e = info.value
    assert cli.is_user_error(e), f"{type(e).__name__} would print a traceback: {e}"
    line = cli.one_line(e)
    assert "\n" not in line and "Traceback" not in line and len(line) < 2000
    return line


# ----------------------------------------------------------------------------- configs
def _validated(arg: str, **kw):
    c = load_config_file(f"{TINY}:{arg}")
    validate(c, num_devices=8, **kw)


CONFIG_CORPUS = [  # (':arg' of configs/tiny.py, text the one line must contain)
    ("nosuch", "'nosuch' is not an algorithm"),
    ("rl.nosuch=1", "rl.nosuch"),
    ("optim.nosuch.deep=1", "optim.nosuch.deep"),
    ("optim.lr=1e30", "optim.lr=1e+30 must be < 1"),          # finding 6
    ("optim.lr=1.0", "optim.lr=1.0 must be < 1"),
    ("optim.lr=1e999", "optim.lr=inf must be finite"),
    ("optim.lr=-1e999", "optim.lr=-inf must be finite"),
    ("optim.lr=-1e-3", "optim.lr=-0.001 must be > 0"),
    ("optim.lr='fast'", "config argument optim.lr=\"'fast'\": Could not override field 'lr'"),
    ("train.sft_lr=3.0", "train.sft_lr=3.0 must be < 1"),
    ("optim.b1=1.0", "optim.b1"),
    ("optim.schedule='linear'", "optim.schedule"),
    ("optim.end_lr_factor=2.0", "optim.end_lr_factor"),
    ("optim.warmup_steps=100000", "optim.warmup_steps=100000 >= the run's"),
    ("sampler.top_k=100", "sampler.top_k=100 exceeds the model's vocabulary (64 tokens)"),
    ("sampler.top_k=-1", "sampler.top_k"),
    ("sampler.top_p=0.0", "sampler.top_p"),
    ("sampler.temperature=0.0", "sampler.temperature"),
    ("sampler.n=0", "sampler.n"),
    ("sampler.batch_size=3,sampler.n=3", "not divisible by the sampler mesh"),
    ("data.truncation='sideways'", "data.truncation='sideways'"),
    ("data.on_bad_row='ignore'", "data.on_bad_row"),
    ("data.format='csv'", "data.format"),
    ("data.format='jsonl'", "data.train_path is required"),
    ("data.format='jsonl',data.train_path='/nonexistent/x.jsonl',model.tokenizer_path='/nonexistent'",
     "does not exist"),
    ("data.format='parquet',data.train_path='x.csv'", "does not end with"),
    ("data.max_prompt_len=0", "data.max_prompt_len"),
    ("rl.tap_layer=9", "rl.tap_layer=9 is out of range"),
    ("rl.tap_layer=0", "rl.tap_layer=0 is out of range"),
    ("rl.clip_low=1.5", "rl.clip_low"),
    ("rl.micro_batch_tokens=8", "rl.micro_batch_tokens=8 is smaller than one sequence"),
    ("mesh.shape=(3,-1,1)", "mesh.shape"),
    ("mesh.shape=None", "mesh.shape is None"),
    ("data.eval_sets=None", "data.eval_sets is None"),
    ("train.steps=0", "train.steps"),
    ("train.prompts_per_step=5", "not divisible by train.mini_batch_prompts"),
    ("train.reward='exact'", "train.reward"),
    ("train.reward_workers=0", "train.reward_workers"),
    ("train.max_skipped_updates=-1", "train.max_skipped_updates"),
    ("train.init_from_hf='/nonexistent'", "train.init_from_hf='/nonexistent' does not exist"),
    ("model.preset=None", "model.preset must name a built-in model"),
    ("model.dtype='int8'", "model.dtype"),
]


@pytest.mark.parametrize("arg,needle", CONFIG_CORPUS, ids=[a for a, _ in CONFIG_CORPUS])
def test_config_corpus_one_clear_line(arg, needle):
    assert needle in user_error(_validated, arg)


def test_every_field_with_hostile_values_fails_as_config_error_or_passes():
    """Each field of tiny.py set to values of the wrong kind: ConfigError or accepted, never a
    crash inside validation. (Reading what it accepted found mesh.shape=None and
    data.eval_sets=None, which crashed the trainer: in CONFIG_CORPUS now.)"""
    fields = list(config_leaf_fields(load_config_file(TINY)))
    assert len(fields) > 80
    for f in fields:
        for v in ("None", "-1", "1e999", "'x'", "()", "True"):
            try:
                _validated(f"{f}={v}")
            except ConfigError as e:
                assert "\n" not in cli.one_line(e)


def test_context_beyond_model_positions(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 4, "vocab_size": 64,
                                                      "max_position_embeddings": 40}))
    line = user_error(_validated, f"model.hf_path='{tmp_path}'")
    assert "data.max_prompt_len + sampler.max_new_tokens" in line and "max_position_embeddings=40" in line


def _config_flag_values(argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
    fv(["prog", *argv])
    return fv.config


def test_finding9_arg_error_through_config_flag_is_one_problem():
    """ml_collections re-raises `ConfigError(message + traceback)`: that was 865 'problems',
    one character each."""
    with pytest.raises(flags.IllegalFlagValueError) as info:
        _config_flag_values([f"--config={TINY}:rl.nosuch=1"])
    line = cli.one_line(info.value)
    assert line.endswith("invalid config: config argument 'rl.nosuch': no such field")
    assert "Traceback" not in line and "\n" not in line
    err = ConfigError("Error whilst parsing config file:\n\nTraceback (most recent call last):\n"
                      '  File "x.py", line 1, in <module>\noisd_jax.config.ConfigError: invalid config (2 '
                      "problems):\n  - a.b=1 is bad\n  - c.d=2 is bad\n")
    assert err.problems == ["invalid config (2 problems); a.b=1 is bad; c.d=2 is bad"]


# ----------------------------------------------------------------------------- data files
def _read(path, policy="skip"):
    from oisd_jax import data as D
    return D.read_records(path, D.QA_FIELDS, on_bad_row=policy)


def test_non_utf8_jsonl_row_follows_on_bad_row(tmp_path):
    """Finding 10b: one undecodable line aborted the whole read even with on_bad_row=skip."""
    p = tmp_path / "d.jsonl"
    good = json.dumps({"question": "1+1?", "answer": "2"}).encode()
    p.write_bytes(good + b"\n" + b'{"question": "\xff\xfe?", "answer": "3"}\n' + good + b"\n")
    records, stats = _read(p)
    assert len(records) == 2 and stats.num_bad == 1 and "row 1" in stats.first_bad and "UTF-8" in stats.first_bad
    line = user_error(_read, p, "error")
    assert f"{p}: row 1" in line and "not UTF-8" in line


@pytest.mark.parametrize("content", [b"PAR1garbage", b"", b"\x00" * 64], ids=["garbage", "empty", "zeros"])
def test_unreadable_parquet_names_the_file(tmp_path, content):
    p = tmp_path / "d.parquet"
    p.write_bytes(content)
    assert f"{p}: not a readable parquet file" in user_error(_read, p)


def test_truncated_parquet_names_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["1+1?"] * 50, "answer": ["2"] * 50}), p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    assert "not a readable parquet file" in user_error(_read, p)


@pytest.mark.parametrize("rows,needle", [
    (['{"question": "q"}'], "field 'answer': missing"),
    (["not json"], "not valid JSON"),
    (["[1, 2]"], "not a JSON object"),
    (['{"question": "", "answer": "1"}'], "field 'question': empty"),
], ids=["missing", "json", "array", "empty"])
def test_bad_jsonl_rows_name_row_and_field(tmp_path, rows, needle):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(rows) + "\n")
    line = user_error(_read, p, "error")
    assert f"{p}: row 0" in line and needle in line


def test_missing_data_file():
    assert "/nonexistent/d.jsonl" in user_error(_read, "/nonexistent/d.jsonl")


# ----------------------------------------------------------------------------- truncation
def test_truncation_counted_warned_once_and_error_names_record(caplog):
    """Finding 8: over-long prompts were cut from the left with no count and no warning."""
    from oisd_jax import data as D
    tok = D.synthetic_tokenizer()
    recs = D.make_problems(8, seed=0)
    it = D.make_prompt_dataset(recs, tok, max_prompt_len=6, seed=0)
    counter = D.CutCounter()
    with caplog.at_level(logging.WARNING):
        batches = [D.next_batch(it, 4) for _ in range(2)]
        cuts = [counter.observe(b) for b in batches]
    assert cuts == [4, 4] and counter.total == 8 and all(len(e["prompt_ids"]) == 6 for b in batches for e in b)
    warned = [r for r in caplog.records if "longer than data.max_prompt_len" in r.getMessage()]
    assert len(warned) == 1 and "4 of 4 training prompts" in warned[0].getMessage()
    it = D.make_prompt_dataset(recs, tok, max_prompt_len=6, seed=0, truncation="error")
    line = user_error(D.next_batch, it, 1)
    assert "training record" in line and "tokens > data.max_prompt_len=6" in line


# ----------------------------------------------------------------------------- model folders
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_qwen3")
    save_hf_model("qwen3", path, seed=1)
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _set_tensor(folder, name, fn):
    from safetensors.numpy import load_file, save_file
    f = os.path.join(folder, "model.safetensors")
    t = load_file(f)
    t[name] = fn(t[name])
    save_file(t, f, metadata={"format": "pt"})


def test_finding7_nonfinite_weight_refused_at_load(hf_dir, tmp_path):
    from oisd_jax.model import load_hf
    bad = _copy(hf_dir, tmp_path / "nan")
    _set_tensor(bad, "model.layers.2.mlp.up_proj.weight", lambda w: np.where(np.arange(w.size).reshape(w.shape) == 7,
                                                                             np.nan, w).astype(w.dtype))
    line = user_error(load_hf, bad)
    assert "tensor model.layers.2.mlp.up_proj.weight has 1 non-finite value(s)" in line


@pytest.mark.parametrize("cut", [4, 100, -16], ids=["header", "mid-header", "data"])
def test_truncated_safetensors_named(hf_dir, tmp_path, cut):
    from oisd_jax.model import load_hf
    bad = _copy(hf_dir, tmp_path / "cut")
    f = bad / "model.safetensors"
    blob = f.read_bytes()
    f.write_bytes(blob[:cut] if cut > 0 else blob[:cut])
    line = user_error(load_hf, bad)
    assert str(f) in line and ("truncated" in line or "not a readable safetensors" in line)


def test_hf_folder_without_weights_or_config(hf_dir, tmp_path):
    from oisd_jax.model import load_hf
    bad = _copy(hf_dir, tmp_path / "noweights")
    os.remove(bad / "model.safetensors")
    assert "no *.safetensors files" in user_error(load_hf, bad)
    os.remove(bad / "config.json")
    assert "config.json" in user_error(load_hf, bad)


def test_finding3_init_from_hf_checks_every_shape(tmp_path):
    """A folder with another hidden size was accepted (only layers and vocabulary compared)."""
    from oisd_jax.model import ModelConfig, init_params, save_hf, shape_mismatch
    from oisd_jax.train_setup import build_setup
    tiny = ModelConfig.preset("tiny")
    other = tiny.replace(hidden_size=96)
    save_hf(other, init_params(other, jax.random.key(0)), tmp_path / "wide")
    s = build_setup(tiny_config(train__init_from_hf=str(tmp_path / "wide")))
    line = user_error(s.init_params, jax.random.key(0))
    assert "does not fit the configured model" in line and "embed" in line and "(64, 96)" in line
    assert shape_mismatch(init_params(tiny, jax.random.key(0)), tiny) is None


# ----------------------------------------------------------------------------- divergence
def test_finding6_exploding_update_is_skipped_inside_the_step():
    """A finite grad norm whose update makes the params inf (an lr past float32's range) is
    skipped by the in-jit check; before, only the grad norm was checked and inf was applied.
    (Validation now refuses lr >= 1, such as the issue's 1e30, before anything compiles.)"""
    from oisd_jax.model import ModelConfig, init_params
    from oisd_jax.rl.batch import build_train_batch
    from oisd_jax.rl.step import StepConfig, make_train_step
    from oisd_jax.rl.train_state import init_train_state
    cfg = ModelConfig.preset("tiny")
    rng = np.random.default_rng(0)
    batch = build_train_batch([rng.integers(2, 60, 5).tolist() for _ in range(4)],
                              [rng.integers(2, 60, 6).tolist() for _ in range(4)], [6] * 4,
                              rng.normal(size=4), row_len=16, rows_per_micro=2, num_micro=2,
                              attn_steps=2, attn_window=2, attn_stride=2, rng=rng)
    batch = batch.replace(old_logp=np.zeros(batch.tokens.shape, np.float32))
    params = init_params(cfg, jax.random.key(0))
    leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]  # noqa: E731
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))  # noqa: E731
    sc = StepConfig(lr=1e39, grad_clip=0.0, logit_chunk=None, dual_clip=None)  # inf in float32
    state, m = make_train_step(cfg, sc)(init_train_state(jax.tree.map(jnp.copy, params), sc), batch)
    assert np.isfinite(float(m["grad_norm"])) and int(m["update_skipped"]) == 1 and int(state.skipped) == 1
    assert same(state.params, params)
    state, m = make_train_step(cfg, sc.replace(lr=1e-3))(state, batch)  # a sane update still applies
    assert int(m["update_skipped"]) == 0 and int(state.skipped) == 1 and not same(state.params, params)


def test_skip_guard_stops_after_consecutive_skips():
    g = SkipGuard(limit=3)
    g.observe(2, 1, 1)  # one of two skipped: the run of skips restarts
    g.observe(4, 3, 2)
    with pytest.raises(DivergenceError, match="last 4 optimizer updates were all skipped"):
        g.observe(6, 5, 3)
    assert SkipGuard(0).observe(8, 8, 4) is None  # 0 = never stop
    assert g.summary() == "5 of 6 optimizer updates skipped for non-finite values this run"


def test_finding7_nan_weights_stop_the_run(tmp_path, monkeypatch):
    """A NaN weight skipped every update, and the run exited 0 writing checkpoints."""
    from oisd_jax import train_setup
    from oisd_jax.train import train
    orig = train_setup.Setup.init_params
    monkeypatch.setattr(train_setup.Setup, "init_params",
                        lambda self, key: jax.tree.map(lambda p: p * jnp.nan, orig(self, key)))
    config = tiny_config(train__sft_warmup_steps=0, train__steps=3, train__max_skipped_updates=1,
                         train__checkpoint_every=0)
    line = user_error(train, config, str(tmp_path / "run"))
    assert "stopped at RL step 1" in line and "all skipped" in line
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def mesh():
    from jax.sharding import Mesh
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))


def _shardings(mesh, state):
    from jax.sharding import NamedSharding, PartitionSpec as P
    return jax.tree.map(lambda x: getattr(x, "sharding", NamedSharding(mesh, P())), state)


def test_finding4_corrupt_newest_moved_aside_so_the_step_saves_again(tmp_path, mesh):
    ckdir = tmp_path / "ck"
    with Checkpointer(ckdir, async_save=False) as ck:
        for step in (1, 2):
            ck.save(step, make_state(mesh, seed=step))
    (ckdir / "2" / "data" / "metadata").write_text("{truncated")
    state = make_state(mesh, seed=0)
    with Checkpointer(ckdir, async_save=False) as ck:
        with pytest.warns(RuntimeWarning, match=r"moved it to .*2\.corrupt-1"):
            assert ck.restore(abstract_state=abstract_of(state, _shardings(mesh, state))).step == 1
        assert ck.all_steps() == [1]
        assert ck.save(2, make_state(mesh, seed=5))  # was refused: "already exists; not saved"
    assert (ckdir / "2.corrupt-1" / "data").is_dir()  # kept for inspection
    with Checkpointer(ckdir, async_save=False) as ck:
        assert ck.all_steps() == [1, 2]
        assert int(ck.restore(abstract_state=abstract_of(state, _shardings(mesh, state))).state["step"]) == 5


def test_finding5_unwritable_checkpoint_folder_refused_before_training(tmp_path):
    from oisd_jax.train import train
    (tmp_path / "file").write_text("")
    line = user_error(Checkpointer, tmp_path / "file" / "ck")
    assert "is not writable" in line and str(tmp_path / "file" / "ck") in line
    # the trainer stops before it builds (or compiles) anything
    assert "is not writable" in user_error(train, tiny_config(), str(tmp_path / "file" / "run"))


def test_finding5_failing_save_stops_with_a_message(tmp_path, mesh):
    with Checkpointer(tmp_path / "ck", async_save=False) as ck:
        def full_disk(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        ck._manager.save = full_disk
        line = user_error(ck.save, 1, make_state(mesh))
    assert "checkpoint step 1 could not be saved" in line and "No space left" in line


def test_finding5_stuck_async_save_has_a_bounded_wait(tmp_path):
    ck = Checkpointer(tmp_path / "ck", wait_timeout_s=0.05)
    release = threading.Event()
    real_wait = ck._manager.wait_until_finished
    ck._manager.wait_until_finished = lambda: release.wait()  # a writer stuck on a dead disk
    try:
        assert "did not finish within 0.05 s" in user_error(ck.wait_until_finished)
    finally:
        release.set()
        ck._manager.wait_until_finished = real_wait
        ck.close()


def test_failed_async_save_is_named_as_its_own_step(tmp_path, mesh):
    """A full disk under step 1's background save surfaced at step 2's save as "checkpoint
    step 2 could not be saved" (seen on a real full tmpfs, tests/test_real_fs.py)."""
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, make_state(mesh))
        real_wait = ck._manager.wait_until_finished

        def full_disk():
            raise OSError(errno.ENOSPC, "No space left on device")
        ck._manager.wait_until_finished = full_disk
        line = user_error(ck.save, 2, make_state(mesh))
        ck._manager.wait_until_finished = real_wait
    assert "saving checkpoint step 1 to" in line and "No space left" in line


def test_closed_event_loop_noise_of_a_failed_save_is_dropped(tmp_path, monkeypatch):
    """tensorstore callbacks landing on orbax's closed loop printed dozens of tracebacks."""
    from types import SimpleNamespace
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    Checkpointer(tmp_path / "ck", async_save=False).close()
    Checkpointer(tmp_path / "ck", async_save=False).close()  # wrapped once
    noise = SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"))
    other = SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("something else"))
    sys.unraisablehook(noise)
    sys.unraisablehook(other)
    assert seen == [other]
    monkeypatch.setenv("OISD_DEBUG", "1")
    sys.unraisablehook(noise)
    assert seen == [other, noise]


def test_orphaned_orbax_write_tasks_of_a_failed_save_are_dropped(tmp_path, monkeypatch):
    """A full disk left 20+ orbax fragment-write tasks whose exceptions nobody retrieved;
    when the collector reached them asyncio logged each with a traceback (seen in CI). Here a
    real orphaned task fails in a frame whose file sits under orbax/, and one outside it."""
    import asyncio
    import gc
    import logging
    ns: dict = {}
    exec(compile("async def write_fragment():\n    raise ValueError('RESOURCE_EXHAUSTED')\n",
                 os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "serialization.py"), "exec"), ns)

    async def ours():
        raise ValueError("not orbax")

    def orphan(coro):  # run a task to its failure, never look at it, let it be collected
        loop = asyncio.new_event_loop()
        loop.run_until_complete(asyncio.wait([loop.create_task(coro)]))
        loop.close()
        gc.collect()

    Checkpointer(tmp_path / "ck", async_save=False).close()
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logging.getLogger("asyncio").addHandler(handler)
    try:
        orphan(ns["write_fragment"]())
        orphan(ours())
        assert [str(r.msg).splitlines()[0] for r in seen] == ["Task exception was never retrieved"]
        assert "not orbax" in str(seen[0].exc_info[1])
        monkeypatch.setenv("OISD_DEBUG", "1")
        orphan(ns["write_fragment"]())
        assert len(seen) == 2 and "RESOURCE_EXHAUSTED" in str(seen[1].exc_info[1])
    finally:
        logging.getLogger("asyncio").removeHandler(handler)


# ----------------------------------------------------------------------------- workdir lock
def _lock_file(workdir, **owner):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "train.lock"), "w") as f:
        json.dump(owner, f)


def test_finding1_second_trainer_on_a_workdir_is_refused(tmp_path):
    import socket
    from oisd_jax.train import train
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        _lock_file(tmp_path / "run", host=socket.gethostname(), pid=other.pid)
        line = user_error(train, tiny_config(), str(tmp_path / "run"))
        assert f"in use by another trainer (pid {other.pid}" in line
    finally:
        other.communicate(b"")
    # the owner is gone (same host, dead pid): a stale lock is taken over, then released
    with WorkdirLock(tmp_path / "run") as lock:
        assert json.loads(open(lock.path).read())["pid"] == os.getpid()
    assert not os.path.exists(tmp_path / "run" / "train.lock")


def test_lock_from_another_host_or_garbled(tmp_path):
    _lock_file(tmp_path / "a", host="elsewhere-host", pid=1)
    line = user_error(WorkdirLock(tmp_path / "a").acquire)
    assert "host elsewhere-host" in line and "delete" in line
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train.lock").write_text("")  # a writer killed between create and write
    with WorkdirLock(tmp_path / "b") as lock:
        assert lock.held
    assert isinstance(WorkdirLocked("x"), cli.UserError)


# ----------------------------------------------------------------------------- rewards
def test_finding10_reward_worker_dying_at_start_is_replaced(monkeypatch):
    from oisd_jax import rewards
    with rewards.RewardPool("strict", workers=1, timeout_s=5.0) as pool:
        pool._workers[0].proc.kill()  # dies before it reported ready
        assert pool.score(["\\boxed{3}", "\\boxed{4}"], ["3", "3"]).tolist() == [1.0, 0.0]
        assert pool.num_worker_restarts == 1
    monkeypatch.setattr(sys, "executable", shutil.which("false"))  # a broken install: never starts
    with rewards.RewardPool("strict", workers=1, timeout_s=5.0) as pool:
        line = user_error(pool.score, ["x"], ["x"])
    assert f"failed to start {rewards.START_ATTEMPTS} times in a row" in line


# ----------------------------------------------------------------------------- export
def test_finding2_export_refuses_a_full_folder_and_overwrite_drops_stale_shards(tmp_path_factory, tmp_path):
    from oisd_jax import export
    from oisd_jax.model import load_hf
    run = tiny_run(tmp_path_factory)
    out = tmp_path / "hf"
    export.export(run, out, step=1)
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    line = user_error(export.export, run, out, step=2)
    assert f"--out={out} is not empty" in line and "--overwrite" in line
    export.export(run, out, step=2, overwrite=True)
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]
    _, params = load_hf(out)
    _, want = run_files.restore_params(run, run_files.load_run(run).model_cfg, step=2)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)))


def test_export_of_a_corrupt_checkpoint_names_the_step(tmp_path_factory, tmp_path):
    from oisd_jax import export
    run = shutil.copytree(tiny_run(tmp_path_factory), tmp_path / "run")
    for f in (run / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    line = user_error(export.export, run, tmp_path / "hf")
    assert "checkpoint step 2 in" in line and "is unreadable" in line
    (run / "checkpoints" / "1" / "config" / "metadata").write_text("{trunc")
    assert "its saved config is unreadable" in user_error(run_files.read_run_config, run, 1)


# ----------------------------------------------------------------------------- trainer
def test_trainer_reruns_over_a_corrupt_step_and_reports_truncation_and_skips(tmp_path, caplog):
    """Finding 4 end to end, plus the per-step truncation metric, the end-of-run skip count and
    the resume check of a changed config."""
    from oisd_jax.metrics import read_jsonl
    from oisd_jax.train import train
    config = tiny_config(data__max_prompt_len=10, train__sft_warmup_steps=0)
    workdir = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        train(config, str(workdir))
    rows = read_jsonl(workdir / "metrics.jsonl")
    assert [r["prompts_truncated"] for r in rows] == [4, 4]  # every tiny prompt > 10 tokens
    assert any("0 of 2 optimizer updates skipped" in r.getMessage() for r in caplog.records)
    assert not (workdir / "train.lock").exists()
    shutil.rmtree(workdir / "checkpoints" / "2" / "state")
    with pytest.warns(RuntimeWarning, match="moved it to"):
        train(config, str(workdir))
    with Checkpointer(workdir / "checkpoints") as ck:
        assert ck.all_steps() == [1, 2]  # the re-trained step 2 is saved, not discarded
    assert (workdir / "checkpoints" / "2.corrupt-1").is_dir()
    # resuming with another algorithm or prompt limit is another experiment: refused, with the diff
    changed = tiny_config(data__max_prompt_len=12, train__sft_warmup_steps=0, rl__algorithm="grpo")
    line = user_error(train, changed, str(workdir))
    assert "rl.algorithm: 'oisd' -> 'grpo'" in line and "data.max_prompt_len: 10 -> 12" in line
    with changed.unlocked():
        changed.train.allow_config_change = True
    train(changed, str(workdir))  # resumes (nothing left to train)


# ----------------------------------------------------------------------------- the CLIs
def _cli(*args, env=None):
    env = dict(os.environ, **(env or {}))
    p = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    err = [ln for ln in p.stderr.splitlines() if ln.strip() and "cudart_stub" not in ln
           and not ln.startswith("WARNING: All log messages")]
    return p.returncode, err


@pytest.mark.parametrize("args,needle", [
    (("oisd_jax.train", f"--config={TINY}", "--config.optim.learning_rate=1", "--workdir={tmp}/w"),
     "--config.optim.learning_rate: no such config field"),
    (("oisd_jax.train", f"--config={TINY}:rl.nosuch=1", "--workdir={tmp}/w"), "config argument 'rl.nosuch'"),
    (("oisd_jax.export", "--workdir=/nonexistent/run", "--out={tmp}/o"), "no checkpoint folder at /nonexistent/run"),
    (("oisd_jax.plan", f"--config={TINY}:nosuch", "--devices=1", "--target=cpu"), "'nosuch' is not an algorithm"),
    (("oisd_jax.analyze", "--workdir=/nonexistent/run"), "no run folder at /nonexistent/run"),
], ids=["unknown-override", "arg", "export", "plan", "analyze"])
def test_cli_prints_one_line_and_exits_2(args, needle, tmp_path):
    rc, err = _cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert rc == 2, err
    assert len(err) == 2 and err[0].startswith("error: ") and needle in err[0] and err[1] == cli.HINT, err


def test_cli_debug_shows_the_traceback(tmp_path):
    rc, err = _cli("oisd_jax.export", "--workdir=/nonexistent/run", f"--out={tmp_path}/o", env={"OISD_DEBUG": "1"})
    assert rc != 0 and any("Traceback" in ln for ln in err)
