"""Outcome rewards for math rollouts: last-\\boxed{} extraction, math-verify checks, a worker pool.

The reward is host Python (sympy underneath), so it lives outside any jit. Three rules:
- Only the LAST box counts (docs/method.md), so a rollout cannot hedge with several answers.
- Nothing from the model's text is ever eval'd: math-verify runs with its LaTeX extractor
  only (its plain-expression extractor calls sympy's `parse_expr`, which is `eval`).
- Every check is time-bounded. math-verify's own timeouts use `signal.alarm` (main thread
  only, whole seconds), so we switch them off and bound parse + verify together with
  our own `setitimer` in the main thread of the process doing the work. `RewardPool`
  runs checks in worker *processes* (their main threads), and kills a worker that ignores
  its alarm (stuck in C code), so a pathological answer costs at most ~timeout_s.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, Pipe, wait
from typing import Iterator, Literal, Sequence

import numpy as np

from oisd_jax.choices import REWARDS
from oisd_jax.rewards_verl import verl_math_reward

RewardKind = Literal[REWARDS]  # "math" | "strict" | "verl_math", declared once in oisd_jax.choices
DEFAULT_TIMEOUT_S = 5.0
# Real ground truths are < 150 characters (deepmath, MATH500, AIME, AMC); longer "answers"
# are degenerate generations and parsing them is where sympy spends minutes.
MAX_ANSWER_CHARS = 1000
# Grace the parent gives a worker beyond its own alarm before killing it.
_KILL_GRACE_S = 2.0

# --------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, or None.

    Braces are matched with nesting; `\\{` / `\\}` (and any backslash pair) are skipped so
    set answers like `\\boxed{\\{1,2\\}}` work. The brace-less form `\\boxed 42` (used by
    some datasets) yields the text up to the next `$` or newline. If the last box is not
    closed (a truncated rollout) the result is None: an earlier box does not stand in for
    it. Linear time in len(text).
    """
    if not text:
        return None
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i >= n:
        return None
    if text[i] != "{":
        if i == matches[-1].end():  # `\boxedx` is another macro, excluded by the regex
            return None
        end = i
        while end < n and text[end] not in "$\n":
            end += 1
        content = text[i:end].strip()
        return content or None
    depth, j = 0, i
    while j < n:
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
        j += 1
    return None


# --------------------------------------------------------------------------- strict match

_TEXT_MACRO_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_DROP_TOKENS = (
    "\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ",
    "^\\circ", "^{\\circ}", "\\circ", "\\%", "%", "$",
)


def normalize_answer(s: str) -> str:
    """Canonical string for strict matching (no maths: `1/2` and `0.5` stay different)."""
    s = s.strip()
    for _ in range(3):  # unwrap nested \text{\textbf{..}}
        s = _TEXT_MACRO_RE.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for tok in _DROP_TOKENS:
        s = s.replace(tok, "")
    s = "".join(s.split())
    return s.rstrip(".")


def _gold_answer(ground_truth: str) -> str:
    boxed = extract_boxed(ground_truth) if "\\boxed" in ground_truth else None
    return (boxed if boxed is not None else ground_truth).strip()


def strict_reward(response: str, ground_truth: str) -> float:
    """1.0 iff the normalised last boxed answer equals the normalised ground truth."""
    pred = extract_boxed(response)
    if pred is None or len(pred) > MAX_ANSWER_CHARS:
        return 0.0
    gold = normalize_answer(_gold_answer(str(ground_truth)))
    return float(bool(gold) and normalize_answer(pred) == gold)


# --------------------------------------------------------------------------- math-verify


class RewardTimeout(BaseException):
    """Raised by our alarm; a BaseException so math-verify's `except Exception` can't eat it."""


class _DropTimeoutDisabledWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


@functools.cache
def _math_verify():
    """Import math-verify lazily (sympy import ~1 s) and configure it once per process."""
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
    # LaTeX extraction only (never sympy's eval-based parse_expr); we always wrap the
    # answer in \boxed{} so the box is what gets matched.
    config = [math_verify.LatexExtractionConfig(boxed_match_priority=0)]
    return math_verify, config


def _parse(text: str) -> list:
    mv, config = _math_verify()
    return mv.parse(f"\\boxed{{{text}}}", extraction_config=config, parsing_timeout=None)


@functools.lru_cache(maxsize=8192)
def _parse_cached(text: str) -> tuple:
    # Parsing is ~all of the cost, and it repeats: G rollouts share one ground truth and
    # often the same answer. Timeouts raise, so they are never cached.
    return tuple(_parse(text))


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise RewardTimeout in the main thread after `seconds` (no-op if None)."""
    if seconds is None:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("time_limit needs the main thread (it uses SIGALRM)")

    def _on_alarm(signum, frame):
        raise RewardTimeout()

    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    old_delay, _ = signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # someone else's timer was running: give back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 1e-3))


@functools.lru_cache(maxsize=None)
def _warm_up() -> None:
    """First use of math-verify imports sympy and builds its LaTeX grammar (seconds on a
    loaded machine): do it once outside the per-answer time bound, or it times out."""
    _parse_cached("1")


def _math_check(pred: str, ground_truth: str) -> float:
    gold_text = _gold_answer(ground_truth)
    gold = _parse_cached(gold_text)
    target = list(_parse_cached(pred))
    if not gold or not target:
        # Unparseable on either side (e.g. a word answer): fall back to strict matching.
        return float(bool(gold_text) and normalize_answer(pred) == normalize_answer(gold_text))
    mv, _ = _math_verify()
    return float(mv.verify(list(gold), target, timeout_seconds=None))


def score_one(
    kind: RewardKind, response: str, ground_truth: str, timeout_s: float | None
) -> tuple[float, bool]:
    """(reward, timed_out) for one rollout, run in the calling (main) thread."""
    if kind == "strict":
        return strict_reward(response, ground_truth), False
    if kind == "verl_math":  # verl's math.compute_score: string work only (rewards_verl)
        return verl_math_reward(response, ground_truth), False
    if kind != "math":
        raise ValueError(f"unknown reward kind {kind!r}; expected one of {REWARDS}")
    pred = extract_boxed(response)
    if pred is None or len(pred) > MAX_ANSWER_CHARS:
        return 0.0, False
    _warm_up()
    try:
        with time_limit(timeout_s):
            return _math_check(pred, str(ground_truth)), False
    except RewardTimeout:
        return 0.0, True
    except Exception:  # a checker crash on model text is a wrong answer, not a dead run
        logging.getLogger(__name__).debug("math check failed", exc_info=True)
        return 0.0, False


def math_reward(response: str, ground_truth: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 iff the last boxed answer of `response` equals `ground_truth` per math-verify.

    Ground truth may be plain ("1/2", "0.5", "-3", "(1,2]") or LaTeX ("\\frac{1}{2}",
    "5\\text{ cm}"); it is parsed as if boxed. No box, an unparseable box, a timeout or a
    checker error give 0. In the main thread the check is bounded by SIGALRM; elsewhere
    (signals are main-thread only) it is sent to a shared one-process RewardPool.
    """
    if threading.current_thread() is threading.main_thread():
        return score_one("math", response, ground_truth, timeout_s)[0]
    return float(_shared_pool(timeout_s).score([response], [ground_truth])[0])


_SHARED_POOLS: dict[float, "RewardPool"] = {}
_SHARED_LOCK = threading.Lock()


def _shared_pool(timeout_s: float) -> "RewardPool":
    with _SHARED_LOCK:
        if timeout_s not in _SHARED_POOLS:
            _SHARED_POOLS[timeout_s] = RewardPool("math", workers=1, timeout_s=timeout_s)
        return _SHARED_POOLS[timeout_s]


# --------------------------------------------------------------------------- worker pool


def _worker_main(fd: int, kind: str, timeout_s: float) -> None:
    """Entry point of a pool worker process: score (slot, response, answer) until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    conn = Connection(fd)
    if kind == "math":
        _math_verify()
        score_one("math", "\\boxed{1}", "1", timeout_s)  # warm sympy before reporting ready
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        slot, response, answer = msg
        conn.send((slot, *score_one(kind, response, answer, timeout_s)))


class _Worker:
    """One scoring subprocess. A fresh interpreter (not multiprocessing's fork/spawn), so it
    neither forks a multithreaded JAX process nor re-imports the trainer's __main__."""

    def __init__(self, kind: str, timeout_s: float):
        parent, child = Pipe(duplex=True)
        code = (
            "import sys; from oisd_jax.rewards import _worker_main; "
            "_worker_main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]))"
        )
        # The child must import this very package, wherever the parent found it.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        paths = [root] + [p or os.getcwd() for p in sys.path]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(child.fileno()), kind, repr(timeout_s)],
            pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL,
        )
        child.close()
        self.conn = parent
        self.ready = False
        self.busy_slot: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.conn.close()


START_ATTEMPTS = 3  # consecutive start-up deaths before the pool gives up (a broken install)


class RewardPool:
    """Scores batches of rollouts in `workers` subprocesses, each check bounded in time.

    `submit(responses, answers)` returns a concurrent.futures.Future of a float32 array
    (jobs run in submission order), so the trainer can overlap rewards with other host
    work; `score(...)` waits for it. Timeouts score 0 and are counted in `num_timeouts`;
    a worker that dies or hangs past its alarm is replaced, one that dies while starting
    too (up to START_ATTEMPTS in a row).
    """

    def __init__(self, kind: RewardKind = "math", workers: int = 2,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        if kind not in REWARDS:
            raise ValueError(f"unknown reward kind {kind!r}; expected one of {REWARDS}")
        if workers < 1 or timeout_s <= 0:
            raise ValueError(f"need workers >= 1 and timeout_s > 0, got {workers}, {timeout_s}")
        self.kind, self.timeout_s = kind, float(timeout_s)
        self.num_timeouts = 0
        self.num_nonfinite = 0  # NaN/inf rewards scored 0 by rollout.score
        self.num_worker_restarts = 0
        self.num_start_failures = 0  # in a row; a worker that comes up resets it
        self._workers = [_Worker(kind, self.timeout_s) for _ in range(workers)]
        self._jobs: queue.Queue = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="reward-pool", daemon=True)
        self._thread.start()

    def submit(self, responses: Sequence[str], answers: Sequence[str]) -> concurrent.futures.Future:
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((list(map(str, responses)), list(map(str, answers)), future))
        return future

    def score(self, responses: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        return self.submit(responses, answers).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._thread.join()
        for w in self._workers:
            with contextlib.suppress(Exception):
                w.conn.send(None)
            w.kill()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- dispatcher thread

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            responses, answers, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._score_job(responses, answers))
            except BaseException as e:  # never leave the caller waiting forever
                future.set_exception(e)

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self.kind, self.timeout_s)
        self.num_worker_restarts += 1

    def _score_job(self, responses: list[str], answers: list[str]) -> np.ndarray:
        out = np.zeros(len(responses), np.float32)
        todo = list(range(len(responses)))[::-1]
        busy, retried = 0, set()
        while todo or busy:
            for w in self._workers:
                if w.ready and w.busy_slot is None and todo:
                    slot = todo.pop()
                    with contextlib.suppress(OSError):  # a dead worker shows up as EOF below
                        w.conn.send((slot, responses[slot], answers[slot]))
                    w.busy_slot, w.deadline = slot, time.monotonic() + self.timeout_s + _KILL_GRACE_S
                    busy += 1
            now = time.monotonic()
            deadlines = [w.deadline for w in self._workers if w.busy_slot is not None]
            wait_s = max(min(deadlines) - now, 0.0) if deadlines else 1.0
            ready = set(wait([w.conn for w in self._workers], timeout=wait_s))
            for i, w in enumerate(self._workers):
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):  # the worker died: retry its item once, then 0
                        if not w.ready:  # died while starting: retried, but a broken install would loop
                            self.num_start_failures += 1
                            if self.num_start_failures >= START_ATTEMPTS:
                                raise RuntimeError(
                                    f"reward workers failed to start {self.num_start_failures} times in a row "
                                    f"(last exit code {w.proc.poll()}); see their stderr above") from None
                        if w.busy_slot is not None:
                            busy -= 1
                            if w.busy_slot not in retried:  # maybe not its fault: once more
                                retried.add(w.busy_slot)
                                todo.append(w.busy_slot)
                        self._replace(i)
                        continue
                    if msg == "ready":
                        w.ready = True
                        self.num_start_failures = 0
                        continue
                    slot, reward, timed_out = msg
                    out[slot] = reward
                    self.num_timeouts += bool(timed_out)
                    w.busy_slot = None
                    busy -= 1
                elif w.busy_slot is not None and time.monotonic() > w.deadline:
                    self.num_timeouts += 1  # stuck past its own alarm: kill it
                    busy -= 1
                    self._replace(i)
        return out
