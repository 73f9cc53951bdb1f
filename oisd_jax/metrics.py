"""Metrics: JSONL + TensorBoard writers, a console progress bar, phase timers, FLOPs/MFU, plots.

Host-side only (never inside jit). Only process 0 writes files; other processes get
writers that do nothing, so the training loop calls them unconditionally.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
import time
from collections import defaultdict
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TB_DIR = "tb"


def _to_scalar(name: str, value: Any) -> float | int:
    """A Python scalar from a Python/NumPy/JAX scalar; anything bigger is a caller bug."""
    arr = np.asarray(value)  # blocks on a jax.Array: metrics are read after the step anyway
    if arr.size != 1:
        raise ValueError(f"metric {name!r} has shape {arr.shape}; only scalars are logged")
    v = arr.reshape(()).item()
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        return v
    raise ValueError(f"metric {name!r}={value!r} is not a number")


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a/b': 1} (TensorBoard groups tags by their first '/')."""
    out = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def tb_tag(name: str) -> str:
    """TensorBoard's tag for a metric name: `pass@4` -> `pass_4` (the same rule tensorboardX applies,
    done here so it does not log a line per metric; metrics.jsonl keeps the original name)."""
    return re.sub(r"[^-/\w.]", "_", name)


_TB_STOPPED = threading.Event()  # tensorboardX's writer thread died (a full disk)


def _one_line_writer_thread_errors(previous):
    """threading.excepthook: tensorboardX's event-writer thread dies on a full disk with a
    15-line traceback (seen on a real full tmpfs); log it as one warning naming the TB folder
    instead (the run's own writes then fail loudly in the main thread). Other threads, and
    everything under OISD_DEBUG, go to the previous hook."""
    from oisd_jax.cli import debug_requested

    def hook(args):
        tb, frames = args.exc_traceback, []
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        if isinstance(args.exc_value, OSError) and any("tensorboardX" in f for f in frames):
            _TB_STOPPED.set()  # writers stop queueing events: nobody would take them off the queue
            if not debug_requested():
                logging.getLogger(__name__).warning("TensorBoard event writer stopped: %s", args.exc_value)
                return
        previous(args)
    hook.oisd_tb_filter = True
    return hook


class MetricsWriter:
    """One JSON object per `write` in `<workdir>/metrics.jsonl` and TensorBoard scalars in
    `<workdir>/tb/`. Appends, so a resumed run continues the same files (readers keep the
    last record of a step: see `read_jsonl`)."""

    def __init__(self, workdir: str | os.PathLike, process_index: int = 0, *,
                 tensorboard: bool = True):
        self.workdir = os.fspath(workdir)
        self.active = process_index == 0
        self._jsonl = self._samples = self._tb = None
        if not self.active:
            return
        os.makedirs(self.workdir, exist_ok=True)
        # line-buffered: a crash loses at most the line being written
        self._jsonl = open(os.path.join(self.workdir, METRICS_FILE), "a", buffering=1,
                           encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # heavy import, only where it is used
            if not getattr(threading.excepthook, "oisd_tb_filter", False):
                threading.excepthook = _one_line_writer_thread_errors(threading.excepthook)
            # an unbounded queue: with its writer thread dead, a full one (default 10 events)
            # blocked the training loop forever in add_scalar
            self._tb = SummaryWriter(logdir=os.path.join(self.workdir, TB_DIR), max_queue=2**30)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float | int]:
        """Log scalar metrics (nested dicts are flattened with '/'); returns what was logged."""
        scalars = {k: _to_scalar(k, v) for k, v in flatten(metrics).items()}
        if not self.active:
            return scalars
        record = {"step": int(step), "time": time.time(), **scalars}
        # NaN/inf are kept (Python's json reads them back) because they flag a broken run.
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None and _TB_STOPPED.is_set():
            self._tb = None  # not closed: closing flushes through the dead thread
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(tb_tag(k), v, global_step=int(step))
        return scalars

    def write_texts(self, step: int, name: str, texts: Sequence[str]) -> None:
        """Sample rollouts etc.: `<workdir>/samples.jsonl` and TensorBoard text."""
        if not self.active:
            return
        if self._samples is None:
            # line-buffered like metrics.jsonl: a killed run kept none of its rollouts otherwise
            self._samples = open(os.path.join(self.workdir, SAMPLES_FILE), "a", buffering=1, encoding="utf-8")
        self._samples.write(json.dumps({"step": int(step), "name": name, "texts": list(texts)}) + "\n")
        if self._tb is not None:
            body = "\n\n---\n\n".join(f"```\n{t}\n```" for t in texts)
            self._tb.add_text(name, body, global_step=int(step))

    def flush(self) -> None:
        for f in (self._jsonl, self._samples, self._tb):
            if f is not None:
                f.flush()

    def close(self) -> None:
        for f in (self._jsonl, self._samples, self._tb):
            if f is not None:
                f.close()
        self._jsonl = self._samples = self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl sorted by step; the last record of a repeated step wins
    (a resumed run re-logs the steps after its checkpoint)."""
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


class ProgressBar:
    """tqdm bar over RL steps with the few numbers worth watching.

    fields: label -> metric key; a missing key is left out of the line.
    """

    DEFAULT_FIELDS = {"reward": "reward", "len": "response_len", "tok/s": "tokens_per_s"}

    def __init__(self, total: int, *, initial: int = 0, process_index: int = 0,
                 fields: Mapping[str, str] | None = None, desc: str = "train"):
        from tqdm import tqdm
        self.fields = dict(fields or self.DEFAULT_FIELDS)
        self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                         disable=process_index != 0)
        self._step = initial

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Move to `step` (the number of finished steps) and show `metrics`."""
        if metrics:
            flat = flatten(metrics)
            shown = {}
            for label, key in self.fields.items():
                if key in flat:
                    shown[label] = f"{float(np.asarray(flat[key])):.4g}"
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(step - self._step)
        self._step = step

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Timer:
    """Seconds per phase of a step, accumulated over repeated entries:

        with timer("sample"): out = sampler.generate(...); jax.block_until_ready(out)

    JAX dispatches asynchronously: block on a phase's outputs inside its `with`, or the
    time lands in whichever later phase first waits for them.
    """

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = self._clock()
        try:
            yield
        finally:
            self.seconds[phase] += self._clock() - t0
            self.counts[phase] += 1

    def summary(self, prefix: str = "time/", reset: bool = True) -> dict[str, float]:
        """{'time/sample': s, ..., 'time/total': sum}; resets the totals by default."""
        out = {f"{prefix}{k}": v for k, v in self.seconds.items()}
        out[f"{prefix}total"] = sum(self.seconds.values())
        if reset:
            self.seconds.clear()
            self.counts.clear()
        return out


# ----------------------------------------------------------------------------- FLOPs / MFU
def forward_flops(num_params: int, tokens: int, *, num_layers: int = 0, attn_dim: int = 0,
                  context_len: float = 0.0, causal: bool = True) -> float:
    """Matmul FLOPs of one forward pass over `tokens` tokens.

        F_fwd = 2 * N * tokens + 4 * num_layers * attn_dim * ctx * tokens

    N: parameters that take part in matmuls per token: all weights except the input
      embedding table (a gather), plus the unembedding [D, V] (count a tied embedding once,
      as the unembedding). Each multiply-add is 2 FLOPs.
    Attention: q.k and (softmax).v each cost 2 * attn_dim FLOPs per (query, key) pair per
      layer; attn_dim = num_heads * head_dim (query heads; GQA shares K/V but not FLOPs).
    ctx: keys attended per query: context_len without a mask, (context_len + 1) / 2 on
      average for causal attention (context_len = the sequence/segment length).
    Extra heads (e.g. OISD's lens logits, 2 * D * V per token) are not included: add them.
    """
    ctx = (context_len + 1) / 2 if causal else context_len
    return 2.0 * num_params * tokens + 4.0 * num_layers * attn_dim * ctx * tokens


def train_flops(num_params: int, tokens: int, *, num_layers: int = 0, attn_dim: int = 0,
                context_len: float = 0.0, causal: bool = True, remat: float = 0.0) -> float:
    """FLOPs of a training step (forward + backward) over `tokens` tokens.

        F_train = (3 + remat) * F_fwd        (= 6 N tokens + attention, with remat=0)

    The backward pass costs twice the forward (gradients w.r.t. activations and weights).
    remat: extra forward passes recomputed in the backward pass: 0 without
      rematerialisation, 1 with full per-layer remat (`nothing_saveable`), in between for
      policies that save some matmul outputs. MFU conventionally uses remat=0 (model
      FLOPs); the hardware FLOPs actually executed include it.
    """
    return (3.0 + remat) * forward_flops(num_params, tokens, num_layers=num_layers,
                                         attn_dim=attn_dim, context_len=context_len,
                                         causal=causal)


def mfu(flops_per_step: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over `peak_flops` (the whole mesh's peak:
    per-device peak x devices, for the dtype the matmuls run in)."""
    if seconds <= 0 or peak_flops <= 0:
        return float("nan")
    return flops_per_step / seconds / peak_flops


# Dense bf16 peak FLOP/s per device (vendor data sheets, no sparsity).
PEAK_BF16_FLOPS = {
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
}


def peak_flops_per_device(device_kind: str) -> float | None:
    """bf16 peak for a `jax.Device.device_kind` string, None if unknown (e.g. CPU)."""
    for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            return PEAK_BF16_FLOPS[name]
    return None


# ----------------------------------------------------------------------------- plots
def plot_curves(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike,
                keys: Iterable[str] | None = None, *, smooth: int = 1) -> list[str]:
    """One panel per metric against step, written to `out_png`; returns the keys plotted.

    keys: metrics to plot (missing ones are skipped); None = every numeric metric.
    smooth: trailing moving-average window (1 = raw values).
    """
    import matplotlib
    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_jsonl)
    present = {k for r in records for k, v in r.items() if isinstance(v, (int, float))}
    present -= {"step", "time"}
    keys = sorted(present) if keys is None else [k for k in keys if k in present]
    if not keys:
        raise ValueError(f"none of the requested metrics are in {metrics_jsonl}")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        # Non-finite points stay in the JSONL but would poison the moving average.
        pts = [(r["step"], r[key]) for r in records
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        steps, vals = np.array(pts, dtype=np.float64).reshape(-1, 2).T
        if smooth > 1:
            csum = np.cumsum(np.insert(vals, 0, 0.0))
            idx = np.arange(1, len(vals) + 1)
            lo = np.maximum(idx - smooth, 0)
            vals = (csum[idx] - csum[lo]) / (idx - lo)
        ax.plot(steps, vals, lw=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return keys
