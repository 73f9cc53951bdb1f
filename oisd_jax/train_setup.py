"""What `train.py` builds once from a config: tokenizer, model, mesh, data, sampler, steps.

Kept apart from the loop so the loop reads like the algorithm and tests can build a
`Setup` without running anything.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import jax
import numpy as np

from oisd_jax import data as D
from oisd_jax import distributed, metrics, parallel
from oisd_jax.config import AlgorithmSettings, algorithm_settings
from oisd_jax.export import run_model_config, run_tokenizer  # one rule for train, eval and export
from oisd_jax.model import ModelConfig, init_params, load_hf
from oisd_jax.rl.batch import TrainBatch, build_train_batch, pack_rows
from oisd_jax.rl.step import StepConfig, batch_shardings, make_logprob_fn, make_train_step
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

    @property
    def row_len(self) -> int:
        return int(self.config.data.max_prompt_len) + int(self.config.sampler.max_new_tokens)

    def init_params(self, key: jax.Array):
        """Random init (preset models) or the weights of a Hugging Face folder."""
        m = self.config.model
        path = self.config.train.init_from_hf or m.hf_path
        if path:
            cfg, params = load_hf(path, dtype=m.param_dtype, mesh=self.mesh)
            if cfg.num_layers != self.model_cfg.num_layers or cfg.vocab_size != self.model_cfg.vocab_size:
                raise ValueError(f"train.init_from_hf={path}: its shape differs from model.hf_path's")
            return params
        return init_params(self.model_cfg, key, mesh=self.mesh)

    def next_prompts(self, it: Iterator) -> list[dict]:
        n = int(self.config.train.prompts_per_step)
        out = D.next_batch(it, n)
        if len(out) < n:
            raise RuntimeError("the training prompt stream ended (it should repeat)")
        return out

    def put_batch(self, batch: TrainBatch) -> TrainBatch:
        """The host batch (the same on every process) -> global arrays sharded like the step
        expects (rows over data x fsdp); each device gets only its rows."""
        return distributed.put_global(batch, batch_shardings(self.mesh, batch.ref_logp is not None))

    def train_flops_per_token(self) -> float:
        c = self.model_cfg
        n = (c.num_layers * (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                             + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
             + c.hidden_size * c.vocab_size)
        return metrics.train_flops(n, 1, num_layers=c.num_layers, attn_dim=c.num_heads * c.head_dim,
                                   context_len=self.row_len / 2)


# ----------------------------------------------------------------------------- building
def _task(config) -> D.ArithmeticTask:
    s = config.data.synthetic
    return D.ArithmeticTask(digits=int(s.digits), ops=tuple(s.ops), num_terms=int(s.num_terms),
                            reasoning=bool(s.reasoning))


def _records(config) -> tuple[list[dict], list[dict]]:
    """(training records, held-out synthetic records) — the latter empty for file data."""
    d = config.data
    if d.format == "synthetic":
        held = D.make_problems(int(d.synthetic.num_eval), seed=int(d.seed) + _EVAL_SEED_OFFSET, task=_task(config))
        seen = {r["expression"] for r in held}
        train = [r for r in D.make_problems(20000, seed=int(d.seed), task=_task(config)) if r["expression"] not in seen]
        return train, held
    fields = _field_map(config)
    records, _ = D.read_many(d.train_path, fields, on_bad_row=d.on_bad_row)
    return records, []


def _field_map(config) -> D.FieldMap:
    d = config.data
    prompt = d.prompt_field or None
    return D.FieldMap(prompt=prompt, question=None if prompt else d.question_field, answer=d.answer_field,
                      system_prompt=d.system_prompt)


def _eval_sets(config, tokenizer, held_out: list[dict]) -> dict[str, tuple[list[dict], int]]:
    d, t = config.data, config.train
    out = {}
    for name, spec in d.eval_sets.items():
        if spec.path is None:
            recs = [{**r, "index": i} for i, r in enumerate(held_out)]
            examples = [{**r, "prompt_ids": D.encode_prompt(tokenizer, r["prompt"], max_prompt_len=int(d.max_prompt_len),
                                                              truncation=d.truncation)} for r in recs]
        else:
            examples = D.load_eval_set(spec.path, _field_map(config), tokenizer=tokenizer,
                                       max_prompt_len=int(d.max_prompt_len), truncation=d.truncation)
        if t.eval_prompts:
            examples = examples[:int(t.eval_prompts)]
        out[name] = (examples, int(spec.k))
    return out


def sampler_settings(config, model_cfg: ModelConfig) -> tuple[dict[str, Any], SamplingParams]:
    """The `Sampler` keyword arguments (all but the mesh) and rollout sampling settings a
    config asks for: one reading for the trainer and the evaluator."""
    sp = config.sampler
    kwargs = dict(max_prompt_len=int(config.data.max_prompt_len), max_new_tokens=int(sp.max_new_tokens),
                  prompt_bucket=int(sp.prompt_bucket), kv_dtype=sp.kv_dtype, truncation=config.data.truncation,
                  decode_segments=sp.get("decode_segments"), engine=sp.get("engine", "static"),
                  slots=int(sp.get("slots", 64)), page_size=int(sp.get("page_size", 16)),
                  pool_pages=sp.get("pool_pages"))
    sampling = SamplingParams(temperature=float(sp.temperature), top_p=float(sp.top_p), top_k=int(sp.top_k),
                              n=int(sp.n), eos_ids=model_cfg.eos_token_ids, greedy=False)
    return kwargs, sampling


def build_setup(config) -> Setup:
    algo = algorithm_settings(config)
    tokenizer = run_tokenizer(config)
    model_cfg = run_model_config(config, tokenizer)
    mesh = parallel.make_mesh(tuple(config.mesh.shape))
    step_cfg = StepConfig.from_config(config)
    phases = (False, True) if algo.use_bupo else (False,)
    cfgs = {p: StepConfig.from_config(config, bupo=True) if p else step_cfg for p in phases}
    sampler_mesh = parallel.make_mesh(tuple(config.mesh.sampler_shape)) if config.mesh.sampler_shape else mesh
    sampler_kwargs, sampling = sampler_settings(config, model_cfg)
    sampler = Sampler(model_cfg, mesh=sampler_mesh, **sampler_kwargs)
    train_records, held = _records(config)
    kind = jax.devices()[0].device_kind
    peak = (metrics.peak_flops_per_device(kind) or float("nan")) * jax.device_count()
    return Setup(config=config, algo=algo, tokenizer=tokenizer, model_cfg=model_cfg, mesh=mesh, step_cfg=step_cfg,
                 step_fns={p: make_train_step(model_cfg, c, mesh) for p, c in cfgs.items()},
                 logprob_fns={p: make_logprob_fn(model_cfg, c, mesh) for p, c in cfgs.items()},
                 sampler=sampler, sampling=sampling, records=train_records,
                 eval_sets=_eval_sets(config, tokenizer, held), peak_flops=peak)


def train_prompt_iterator(s: Setup) -> D.PromptIterator:
    """The global prompt stream. Every process reads all of it (prompts are tiny), so the
    data order does not depend on the process count (see distributed.put_global)."""
    d = s.config.data
    return D.make_prompt_dataset(s.records, s.tokenizer, max_prompt_len=int(d.max_prompt_len), seed=int(d.seed),
                                 truncation=d.truncation)


def eval_examples(s: Setup, name: str) -> list[dict]:
    return s.eval_sets[name][0]


# ----------------------------------------------------------------------------- batches
def _batch_devices(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _pack(s: Setup, prompts, responses, lengths, adv, rng) -> TrainBatch:
    """Pack sequences into [M, R, row_len] with few distinct shapes: R and M are rounded
    up to powers of two (times the batch devices), so compiles stay logarithmic."""
    rl = s.config.rl
    row_len, ndev = s.row_len, _batch_devices(s.mesh)
    max_per_row = max(1, min(16, row_len // 16))
    seq_lens = [len(p) + int(n) for p, n in zip(prompts, lengths) if n > 0]
    rows = 1 + max((r for r, _ in pack_rows(seq_lens, row_len, None, max_per_row)), default=0)
    r_cap = max(ndev, (int(rl.micro_batch_tokens) // row_len) // ndev * ndev)
    r_need = ndev * 2 ** math.ceil(math.log2(max(1, math.ceil(rows / ndev))))
    R = min(r_cap, r_need)
    M = 2 ** math.ceil(math.log2(max(1, math.ceil(rows / R))))
    steps = int(rl.attn_steps) if (s.algo.use_attn or s.step_cfg.oisd_metrics) else 0
    return build_train_batch(prompts, responses, lengths, adv, row_len=row_len, rows_per_micro=R, num_micro=M,
                             attn_steps=steps, attn_window=int(rl.attn_window), attn_stride=int(rl.attn_stride),
                             max_seqs_per_row=max_per_row, rng=rng)


def make_minibatches(s: Setup, ro, adv: np.ndarray, step: int) -> list[TrainBatch]:
    """The step's rollouts split into mini-batches of `mini_batch_prompts` prompts (x n)."""
    t = s.config.train
    per = int(t.mini_batch_prompts) * ro.n
    rng = np.random.default_rng([int(t.seed), step])
    prompts = [p for p in ro.prompt_tokens for _ in range(ro.n)]
    return [_pack(s, prompts[i:i + per], ro.tokens[i:i + per], ro.lengths[i:i + per], adv[i:i + per], rng)
            for i in range(0, len(prompts), per)]


def sft_batches(s: Setup) -> Iterator[TrainBatch]:
    """Supervised warm-up batches of reference responses (synthetic task), advantage 1."""
    t, d = s.config.train, s.config.data
    examples = D.sft_examples(s.records[:4096], s.tokenizer, reasoning=bool(d.synthetic.reasoning))
    rng = np.random.default_rng(int(t.seed))
    n = int(t.sft_batch_size)
    for _ in range(int(t.sft_warmup_steps)):
        idx = rng.choice(len(examples), n, replace=False)
        p = [examples[i][0] for i in idx]
        r = [examples[i][1] for i in idx]
        yield _pack(s, p, r, [len(x) for x in r], np.ones(n, np.float32), rng)
