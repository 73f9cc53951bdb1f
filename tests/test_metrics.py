"""Metrics: JSONL and TensorBoard contents, process gating, plots, timers, FLOPs/MFU."""
import glob
import itertools
import json
import logging
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oisd_jax import metrics
from oisd_jax.metrics import (MetricsWriter, ProgressBar, Timer, forward_flops, mfu,
                              peak_flops_per_device, plot_curves, read_jsonl, train_flops)


def read_tb_scalars(logdir):
    """Parse TFRecord event files by hand (no tensorboard install needed)."""
    from tensorboardX.proto import event_pb2
    out = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in ev.summary.value:
                out.append((ev.step, v.tag, v.simple_value))
    return out


def test_jsonl_and_tensorboard_roundtrip(tmp_path):
    with MetricsWriter(tmp_path) as w:
        logged = w.write(1, {"reward": np.float32(0.25), "loss": {"pg": jnp.asarray(-1.5),
                                                                   "think": 0.125},
                             "tokens": np.int64(1000), "skipped": np.bool_(True)})
        w.write(2, {"reward": 0.5, "loss": {"pg": float("nan")}})
        w.flush()
    assert logged == {"reward": 0.25, "loss/pg": -1.5, "loss/think": 0.125, "tokens": 1000,
                      "skipped": 1}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(l) for l in lines]
    assert len(recs) == 2
    assert {k: v for k, v in recs[0].items() if k != "time"} == {"step": 1, **logged}
    assert isinstance(recs[0]["tokens"], int)
    assert recs[1]["reward"] == 0.5 and math.isnan(recs[1]["loss/pg"])
    tb = read_tb_scalars(tmp_path / "tb")
    assert (1, "reward", 0.25) in tb and (1, "loss/pg", -1.5) in tb and (1, "tokens", 1000.0) in tb
    assert {t for s, t, _ in tb if s == 2} == {"reward", "loss/pg"}


def test_tensorboard_tags_are_legal_without_a_log_line_each(tmp_path, caplog):
    """`pass@4` becomes TensorBoard's `pass_4` here, so tensorboardX logs nothing per metric."""
    with caplog.at_level(logging.INFO), MetricsWriter(tmp_path) as w:
        w.write(3, {"eval/aime24/pass@4": 0.5, "eval/aime24/avg@16": 0.25})
        w.flush()
    assert not [r for r in caplog.records if "illegal" in r.getMessage()]
    assert set(read_tb_scalars(tmp_path / "tb")) == {(3, "eval/aime24/pass_4", 0.5), (3, "eval/aime24/avg_16", 0.25)}
    assert "eval/aime24/pass@4" in json.loads((tmp_path / "metrics.jsonl").read_text())


def test_resume_appends_and_reader_keeps_last_record_per_step(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for s in (1, 2, 3):
            w.write(s, {"reward": s / 10})
    with MetricsWriter(tmp_path, tensorboard=False) as w:  # resumed from a step-2 checkpoint
        w.write(3, {"reward": 0.9})
        w.write(4, {"reward": 1.0})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5
    assert [(r["step"], r["reward"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == \
        [(1, 0.1), (2, 0.2), (3, 0.9), (4, 1.0)]


def test_non_scalars_are_rejected(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="shape"):
            w.write(1, {"per_token": np.zeros(3)})
        with pytest.raises(ValueError, match="not a number"):
            w.write(1, {"name": "x"})


def test_other_processes_write_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricsWriter(workdir, process_index=1) as w:
        assert w.write(1, {"reward": 1.0}) == {"reward": 1.0}
        w.write_texts(1, "samples", ["a"])
        w.flush()
    assert not workdir.exists()


def test_texts(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write_texts(3, "rollouts", ["\\boxed{1}", "no box"])
        # on disk before any flush or close: a killed run keeps the rollouts it logged
        rec = json.loads((tmp_path / "samples.jsonl").read_text())
    assert rec == {"step": 3, "name": "rollouts", "texts": ["\\boxed{1}", "no box"]}


def test_plot_curves_writes_png(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for s in range(1, 21):
            w.write(s, {"reward": s / 20, "response_len": 100 + s, "loss": float("nan") if s == 5
                        else 1 / s})
    out = tmp_path / "plots" / "reward.png"
    assert plot_curves(tmp_path / "metrics.jsonl", out, keys=["reward", "missing"]) == ["reward"]
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    out2 = tmp_path / "all.png"
    assert plot_curves(tmp_path / "metrics.jsonl", out2, smooth=4) == \
        ["loss", "response_len", "reward"]
    assert out2.stat().st_size > out.stat().st_size
    with pytest.raises(ValueError):
        plot_curves(tmp_path / "metrics.jsonl", tmp_path / "x.png", keys=["nope"])


def test_progress_bar(capsys):
    with ProgressBar(total=4, process_index=0) as bar:
        bar.update(1, {"reward": 0.5, "response_len": 123.0, "other": 7})
        bar.update(3, {"reward": 0.75, "tokens_per_s": 2.5e5})
    err = capsys.readouterr().err
    assert "3/4" in err and "reward=0.75" in err and "tok/s=2.5e+05" in err
    with ProgressBar(total=4, process_index=1) as bar:
        bar.update(2, {"reward": 0.5})
    assert capsys.readouterr().err == ""


def test_timer_accumulates_per_phase():
    ticks = itertools.count(0.0, 0.5)  # a fake clock: every reading advances 0.5 s
    t = Timer(clock=lambda: next(ticks))
    with t("sample"):
        pass
    with t("reward"):
        pass
    with t("sample"):
        next(ticks)  # one extra tick inside: 1.0 s
    assert t.counts == {"sample": 2, "reward": 1}
    assert t.summary(reset=False) == {"time/sample": 1.5, "time/reward": 0.5, "time/total": 2.0}
    assert t.summary(prefix="t_") == {"t_sample": 1.5, "t_reward": 0.5, "t_total": 2.0}
    assert t.summary() == {"time/total": 0}
    with pytest.raises(RuntimeError):  # a failing phase still counts its time
        with t("update"):
            raise RuntimeError
    assert t.seconds["update"] == 0.5


def test_forward_flops_matches_xla_count():
    """One attention + MLP block and an unembedding, no mask: XLA's count of the same program."""
    T, D, H, hd, F, V = 128, 64, 4, 16, 256, 512
    A = H * hd
    ks = jax.random.split(jax.random.key(0), 7)
    shapes = {"q": (D, A), "k": (D, A), "v": (D, A), "o": (A, D), "up": (D, F), "down": (F, D),
              "unembed": (D, V)}
    params = {n: jax.random.normal(k, s) for k, (n, s) in zip(ks, shapes.items())}

    def fwd(p, x):
        q, k, v = (jnp.reshape(x @ p[n], (T, H, hd)) for n in "qkv")
        att = jax.nn.softmax(jnp.einsum("thd,shd->hts", q, k) / math.sqrt(hd), axis=-1)
        x = x + jnp.einsum("hts,shd->thd", att, v).reshape(T, A) @ p["o"]
        x = x + jax.nn.relu(x @ p["up"]) @ p["down"]
        return x @ p["unembed"]

    xla = jax.jit(fwd).lower(params, jnp.zeros((T, D))).cost_analysis()["flops"]
    n = sum(math.prod(s) for s in shapes.values())
    ours = forward_flops(n, T, num_layers=1, attn_dim=A, context_len=T, causal=False)
    assert ours == 2 * n * T + 4 * A * T * T
    assert abs(ours - xla) / xla < 0.03  # the rest is softmax/relu/adds


def test_train_flops_and_mfu_closed_forms():
    n, tokens, L, A, ctx = 4_000_000_000, 1_000_000, 36, 4096, 8192
    fwd_causal = 2 * n * tokens + 4 * L * A * (ctx + 1) / 2 * tokens
    assert forward_flops(n, tokens, num_layers=L, attn_dim=A, context_len=ctx) == fwd_causal
    assert train_flops(n, tokens) == 6 * n * tokens
    assert train_flops(n, tokens, num_layers=L, attn_dim=A, context_len=ctx) == 3 * fwd_causal
    assert train_flops(n, tokens, num_layers=L, attn_dim=A, context_len=ctx, remat=1.0) == \
        4 * fwd_causal
    assert mfu(6e15, 2.0, 1e16) == pytest.approx(0.3)
    assert math.isnan(mfu(1.0, 0.0, 1e15))
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device("TPU v5 lite") == 197e12
    assert peak_flops_per_device("cpu") is None
    assert metrics.flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a/b/c": 1, "d": 2}


def test_tensorboard_thread_dying_on_a_full_disk_is_one_warning(tmp_path, monkeypatch, caplog):
    """tensorboardX's writer thread died on a real full tmpfs with a 15-line traceback."""
    import threading
    from types import SimpleNamespace
    seen = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    MetricsWriter(tmp_path).close()
    MetricsWriter(tmp_path).close()  # wrapped once
    ns = {}
    exec(compile("def write(): raise OSError(28, 'No space left on device')", "/x/tensorboardX/record_writer.py",
                 "exec"), ns)
    try:
        ns["write"]()
    except OSError as e:
        tb_args = SimpleNamespace(exc_type=OSError, exc_value=e, exc_traceback=e.__traceback__, thread=None)
    other = SimpleNamespace(exc_type=OSError, exc_value=OSError("x"), exc_traceback=None, thread=None)
    with caplog.at_level("WARNING"):
        threading.excepthook(tb_args)
        threading.excepthook(other)
    assert seen == [other]
    assert "TensorBoard event writer stopped: [Errno 28] No space left on device" in caplog.text
    from oisd_jax import metrics
    try:
        w = MetricsWriter(tmp_path)
        w.write(1, {"a": 1.0})  # stops queueing events for the dead thread
        assert w._tb is None and "a" in open(tmp_path / "metrics.jsonl").read()
        w.close()
    finally:
        metrics._TB_STOPPED.clear()
