"""What `train.py` builds once from a config: tokenizer, model, mesh, data, sampler, steps.

Kept apart from the loop so the loop reads like the algorithm and tests can build a
`Setup` without running anything.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from oisd_jax import data as D
from oisd_jax import distributed, metrics, parallel
from oisd_jax.config import AlgorithmSettings
from oisd_jax.run_files import model_config_for, run_tokenizer  # one rule for train, eval and export
from oisd_jax.model import ModelConfig, init_params, load_hf, shape_mismatch
from oisd_jax.rl.batch import TrainBatch, build_train_batch, pack_rows
from oisd_jax.rl.step import StepConfig, make_logprob_fn, make_train_step
from oisd_jax.rl.train_state import row_sharding
from oisd_jax.run_spec import DataSpec, EvalSpec, RunSpec, SamplerSpec, resolve
from oisd_jax.sampler import Sampler, SamplingParams

_EVAL_SEED_OFFSET = 1_000_003  # held-out synthetic problems come from another seed


@dataclasses.dataclass
class Setup:
    config: Any
    algo: AlgorithmSettings
    tokenizer: Any
    model_cfg: ModelConfig
    mesh: jax.sharding.Mesh
    step_cfg: StepConfig
    step_fns: dict[bool, Any]       # bupo phase -> jitted train step
    logprob_fns: dict[bool, Any]    # bupo phase -> jitted old-log-prob pass
    sampler: Sampler
    sampling: SamplingParams
    records: list[dict]
    eval_sets: dict[str, tuple[list[dict], int]]  # name -> (examples with prompt_ids, k)
    peak_flops: float
    prompt_cuts: D.CutCounter = dataclasses.field(default_factory=D.CutCounter)  # truncated training prompts
    spec: RunSpec | None = None     # None: resolved from `config` (without the device checks)

    def __post_init__(self):
        if self.spec is None:
            self.spec = resolve(self.config, num_devices=None, check_paths=False)
        self.prompt_cuts.truncation = self.spec.data.truncation  # its warning says what the cut kept

    @property
    def row_len(self) -> int:
        return self.spec.packing.row_len

    def init_params(self, key: jax.Array):
        """Random init (preset models) or the weights of a Hugging Face folder."""
        m = self.spec.model
        path = m.init_from_hf or m.hf_path
        if path:
            cfg, params = load_hf(path, dtype=m.param_dtype, mesh=self.mesh)
            bad = shape_mismatch(params, self.model_cfg)  # every tensor: a D mismatch trained, then could not resume
            if bad:
                raise ValueError(f"train.init_from_hf={path} does not fit the configured model: {bad}")
            return params
        return init_params(self.model_cfg, key, mesh=self.mesh)

    def next_prompts(self, it: Iterator) -> list[dict]:
        n = self.spec.train.prompts_per_step
        out = D.next_batch(it, n)
        if len(out) < n:
            raise RuntimeError("the training prompt stream ended (it should repeat)")
        self.prompt_cuts.observe(out)
        return out

    def put_batch(self, batch: TrainBatch) -> TrainBatch:
        """The host batch (the same on every process) -> global arrays sharded like the step
        expects (rows over data x fsdp); each device gets only its rows."""
        return distributed.put_global(batch, row_sharding(self.mesh))

    def train_flops_per_token(self) -> float:
        c = self.model_cfg
        n = (c.num_layers * (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                             + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
             + c.hidden_size * c.vocab_size)
        return metrics.train_flops(n, 1, num_layers=c.num_layers, attn_dim=c.num_heads * c.head_dim,
                                   context_len=self.row_len / 2)


# ----------------------------------------------------------------------------- building
def read_records(d: DataSpec) -> tuple[list[dict], list[dict]]:
    """(training records, held-out synthetic records) — the latter empty for file data."""
    if d.format == "synthetic":
        held = D.make_problems(d.num_synthetic_eval, seed=d.seed + _EVAL_SEED_OFFSET, task=d.task)
        seen = {r["expression"] for r in held}
        train = [r for r in D.make_problems(20000, seed=d.seed, task=d.task) if r["expression"] not in seen]
        return train, held
    records, _ = D.read_many(d.train_path, d.fields, on_bad_row=d.on_bad_row)
    return records, []


def build_eval_sets(d: DataSpec, ev: EvalSpec, tokenizer, held_out: list[dict]) -> dict[str, tuple[list[dict], int]]:
    """name -> (examples with prompt_ids, k): the trainer's eval sets (evaluate builds the same)."""
    out = {}
    for spec in ev.sets:
        if spec.path is None:
            recs = [{**r, "index": i} for i, r in enumerate(held_out)]
            examples = [{**r, "prompt_ids": D.encode_prompt(tokenizer, r["prompt"], max_prompt_len=d.max_prompt_len,
                                                              truncation=d.truncation)} for r in recs]
        else:
            examples = D.load_eval_set(spec.path, d.fields, tokenizer=tokenizer, max_prompt_len=d.max_prompt_len,
                                       truncation=d.truncation)
        if ev.prompts:
            examples = examples[:ev.prompts]
        out[spec.name] = (examples, spec.k)
    return out


def make_sampler(sp: SamplerSpec, model_cfg: ModelConfig, mesh) -> tuple[Sampler, SamplingParams]:
    """The Sampler and rollout sampling settings a run asks for: one construction for the
    trainer, the evaluator and the planner."""
    sampling = dataclasses.replace(sp.sampling, eos_ids=model_cfg.eos_token_ids)
    return Sampler(model_cfg, mesh=mesh, **sp.sampler_kwargs), sampling


def build_setup(config, spec: RunSpec | None = None) -> Setup:
    """spec: the config's RunSpec when the caller resolved it (else resolved here, with
    this process's device count)."""
    spec = spec or resolve(config, num_devices=jax.device_count())
    algo = spec.algo
    tokenizer = run_tokenizer(config)
    model_cfg = model_config_for(spec.model, tokenizer)
    mesh = parallel.make_mesh(spec.mesh.shape)
    phases = (False, True) if algo.use_bupo else (False,)
    cfgs = {p: spec.step_config(bupo=p) for p in phases}
    sampler_mesh = parallel.make_mesh(spec.mesh.sampler_shape) if spec.mesh.sampler_shape else mesh
    sampler, sampling = make_sampler(spec.sampler, model_cfg, sampler_mesh)
    train_records, held = read_records(spec.data)
    kind = jax.devices()[0].device_kind
    peak = (metrics.peak_flops_per_device(kind) or float("nan")) * jax.device_count()
    return Setup(config=config, algo=algo, tokenizer=tokenizer, model_cfg=model_cfg, mesh=mesh, step_cfg=spec.step,
                 step_fns={p: make_train_step(model_cfg, c, mesh) for p, c in cfgs.items()},
                 logprob_fns={p: make_logprob_fn(model_cfg, c, mesh) for p, c in cfgs.items()},
                 sampler=sampler, sampling=sampling, records=train_records,
                 eval_sets=build_eval_sets(spec.data, spec.eval, tokenizer, held), peak_flops=peak, spec=spec)


def train_prompt_iterator(s: Setup) -> D.PromptIterator:
    """The global prompt stream. Every process reads all of it (prompts are tiny), so the
    data order does not depend on the process count (see distributed.put_global)."""
    d = s.spec.data
    return D.make_prompt_dataset(s.records, s.tokenizer, max_prompt_len=d.max_prompt_len, seed=d.seed,
                                 truncation=d.truncation, teacher=d.teacher)


def eval_examples(s: Setup, name: str) -> list[dict]:
    return s.eval_sets[name][0]


# ----------------------------------------------------------------------------- batches
def _batch_devices(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def max_seqs_per_row(row_len: int) -> int:
    """Rollouts a packed row holds at most: each brings Q attention-probe slots."""
    return max(1, min(16, row_len // 16))


def packing_shape(seq_lens: Sequence[int], *, row_len: int, micro_batch_tokens: int,
                  batch_devices: int, teacher: tuple[Sequence[int], int] | None = None) -> tuple[int, int]:
    """(R rows per micro-batch, M micro-batches) that sequences of `seq_lens` tokens are
    packed into: R and M rounded up to powers of two (R a multiple of the batch devices,
    at most micro_batch_tokens' rows), so compiles stay logarithmic. The planner plans
    the worst case, every rollout at full length, through this same function.
    teacher: (teacher sequence lengths, teacher row length) packed beside (OPSD)."""
    place = pack_rows(seq_lens, row_len, None, max_seqs_per_row(row_len), teacher)
    rows = 1 + max((r for r, _ in place), default=0)
    r_cap = max(batch_devices, (micro_batch_tokens // row_len) // batch_devices * batch_devices)
    r_need = batch_devices * 2 ** math.ceil(math.log2(max(1, math.ceil(rows / batch_devices))))
    R = min(r_cap, r_need)
    return R, 2 ** math.ceil(math.log2(max(1, math.ceil(rows / R))))


def _pack(s: Setup, prompts, responses, lengths, adv, rng, teacher_prompts=None, think_w=None,
          steer=None) -> TrainBatch:
    """Pack sequences into [M, R, row_len] (shapes from `packing_shape`); with
    teacher_prompts, OPSD's teacher rows [M, R, teacher_row_len] beside them; think_w: the
    rollouts' OISD weights (None: the step clips the advantage, the signed mode); steer:
    OGLS-SD's (groups, correct) per rollout."""
    pk = s.spec.packing
    seq_lens = [len(p) + int(n) for p, n in zip(prompts, lengths) if n > 0]
    teacher = None
    if teacher_prompts is not None:
        teacher = ([len(p) + int(n) for p, n in zip(teacher_prompts, lengths) if n > 0], pk.teacher_row_len)
    R, M = packing_shape(seq_lens, row_len=pk.row_len, micro_batch_tokens=pk.micro_batch_tokens,
                         batch_devices=_batch_devices(s.mesh), teacher=teacher)
    row_len, max_per_row = pk.row_len, max_seqs_per_row(pk.row_len)
    b = build_train_batch(prompts, responses, lengths, adv, row_len=row_len, rows_per_micro=R, num_micro=M,
                          attn_steps=pk.attn_steps, attn_window=pk.attn_window, attn_stride=pk.attn_stride,
                          max_seqs_per_row=max_per_row, rng=rng, head_len=0, teacher_prompt_tokens=teacher_prompts,
                          teacher_row_len=pk.teacher_row_len if teacher_prompts is not None else None,
                          think_weights=think_w, steer_groups=None if steer is None else steer[0],
                          steer_correct=None if steer is None else steer[1], steer_unit=s.step_cfg.ogls_unit)
    return with_head_positions(b, row_len)


def with_head_positions(b: TrainBatch, row_len: int) -> TrainBatch:
    """The vocabulary head only at the loss positions, padded to a power of two (few
    shapes), when that is shorter than the row; else the full head (head_positions None).

    Exact: every head term is weighted by the loss mask, so the skipped positions add 0
    (tests/test_step.py, tests/test_train.py). Prompts and padding leave their [T, V]
    logits out (bench/README.md: 4.73 -> 4.43 s a GRPO step, 6.15 -> 5.70 s an OISD one).
    """
    hp = b.head_positions
    th = 2 ** math.ceil(math.log2(max(1, hp.shape[-1])))
    if b.teacher_head_positions is None and th >= row_len:
        return b.replace(head_positions=None)
    th = min(th, row_len)  # OPSD pairs teacher and student by head position: always compact
    pad = lambda x: np.concatenate([x, np.full(x.shape[:-1] + (th - x.shape[-1],), -1, x.dtype)], -1)  # noqa: E731
    if b.teacher_head_positions is not None:
        b = b.replace(teacher_head_positions=pad(b.teacher_head_positions))
    return b.replace(head_positions=pad(hp))


def make_minibatches(s: Setup, ro, adv: np.ndarray, step: int,
                     teacher_prompts: Sequence[np.ndarray] | None = None,
                     think_w: np.ndarray | None = None, rewards: np.ndarray | None = None) -> list[TrainBatch]:
    """The step's rollouts split into mini-batches of `mini_batch_prompts` prompts (x n).
    teacher_prompts: OPSD's teacher prompt of each prompt (Example["teacher_ids"]);
    think_w: per-rollout OISD weights like `adv` (rl.think_weight_mode other than signed);
    rewards: per-rollout rewards like `adv`, OGLS-SD's pools (correct = reward > 0.5; the
    group is the prompt's index in its mini-batch, so a group never straddles two)."""
    t = s.spec.train
    per = t.mini_batch_prompts * ro.n
    rng = np.random.default_rng([t.seed, step])
    prompts = [p for p in ro.prompt_tokens for _ in range(ro.n)]
    tps = None if teacher_prompts is None else [p for p in teacher_prompts for _ in range(ro.n)]
    groups = np.arange(per) // ro.n

    def steer(i):
        return None if rewards is None else (groups[:len(rewards[i:i + per])], np.asarray(rewards[i:i + per]) > 0.5)
    return [_pack(s, prompts[i:i + per], ro.tokens[i:i + per], ro.lengths[i:i + per], adv[i:i + per], rng,
                  None if tps is None else tps[i:i + per], None if think_w is None else think_w[i:i + per],
                  steer(i))
            for i in range(0, len(prompts), per)]


def sft_batches(s: Setup) -> Iterator[TrainBatch]:
    """Supervised warm-up batches of reference responses (synthetic task), advantage 1."""
    t = s.spec.train
    examples = D.sft_examples(s.records[:4096], s.tokenizer, reasoning=s.spec.data.task.reasoning)
    longest = max(len(r) for _, r in examples)
    if longest > s.spec.sampler.max_new_tokens:  # the policy could never write what it is taught
        raise ValueError(f"sampler.max_new_tokens={s.spec.sampler.max_new_tokens} is shorter than the warm-up's "
                         f"reference responses (up to {longest} tokens with data.synthetic.reasoning="
                         f"{s.spec.data.task.reasoning}); raise it or set train.sft_warmup_steps=0")
    rng = np.random.default_rng(t.seed)
    n = t.sft_batch_size
    for _ in range(t.sft_warmup_steps):
        idx = rng.choice(len(examples), n, replace=False)
        p = [examples[i][0] for i in idx]
        r = [examples[i][1] for i in idx]
        yield _pack(s, p, r, [len(x) for x in r], np.ones(n, np.float32), rng)
