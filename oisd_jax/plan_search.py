"""The planner's searches: the largest micro-batch / sampler batch that fit, and a sweep of
what moves the train step's memory. Every probe is one deviceless compile, so searches
take few steps."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from oisd_jax.plan_compile import GiB, Budget, Compiled, PhaseResult, Target, compile_program
from oisd_jax.plan_programs import PlanSetup, sampler_cache_bytes, sampler_phase, train_phase


def _probed(what: str, total: int, limit: int, seconds: float) -> int:
    """One line per probe: each is a compile of minutes on a big config, and a search of
    up to a dozen of them would otherwise print nothing for most of an hour."""
    verdict = "fits" if total <= limit else "over"
    print(f"search    {what}: {total / GiB:.2f} GiB, {verdict} ({seconds:.0f} s)", flush=True)
    return total


def suggest_linear(measure: Callable[[int], int], limit: int, start: int, *, max_calls: int = 7,
                   max_value: int = 1 << 16, known: dict[int, int] | None = None) -> tuple[int, dict[int, int]]:
    """Largest integer k >= 1 with measure(k) <= limit, for a measure that grows about
    linearly with k (each call is a compile, so few calls).

    Secant steps inside a bracket [largest fit, smallest non-fit]. `known`: values already
    measured (the plan's own phases), used without calling `measure` and not counted in
    `max_calls`. Returns (k, or 0 if even k = 1 does not fit; {k: measured}). Stops early
    with the best fit found.
    """
    seen: dict[int, int] = dict(known or {})
    calls = [0]

    def m(k: int) -> int:
        if k not in seen:
            seen[k] = measure(k)
            calls[0] += 1
        return seen[k]

    lo, hi = 0, max_value + 1  # fits / does not fit
    for k in (max(1, start), 2 * max(1, start)):
        if k < hi:
            if m(k) <= limit:
                lo = max(lo, k)
            else:
                hi = min(hi, k)
    while hi - lo > 1 and calls[0] < max_calls:
        if lo == 0:
            guess = 1 if hi > 1 and 1 not in seen else hi // 2
        else:
            # Slope from the measured point nearest above lo (or the two smallest points).
            pts = sorted(seen)
            above = [k for k in pts if k > lo]
            k2 = above[0] if above else (pts[-2] if len(pts) > 1 and pts[-2] != lo else None)
            slope = max((seen[k2] - seen[lo]) / (k2 - lo), 1e-9) if k2 is not None else seen[lo] / lo
            guess = lo + int((limit - seen[lo]) // slope)
        guess = min(max(guess, lo + 1), hi - 1)
        if m(guess) <= limit:
            lo = guess
        else:
            hi = guess
    return lo, seen


def sweep(setup: PlanSetup, target: Target) -> list[tuple[str, Compiled]]:
    """Train-step temporaries against micro-batch rows, remat policy, loss chunking, attention."""
    out = []
    base_rows = setup.batch_shards
    m = setup.model
    variants: list[tuple[str, PlanSetup]] = []
    for k in (1, 2, 4):
        variants.append((f"{k} row(s)/device ({k * base_rows * setup.row_len} tok)",
                         setup.replace(micro_batch_tokens=k * base_rows * setup.row_len)))
    one = setup.replace(micro_batch_tokens=base_rows * setup.row_len)
    for pol in ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable"):
        if pol != m.remat_policy:
            variants.append((f"remat={pol}", one.replace(model=m.replace(remat_policy=pol))))
    if setup.step_cfg.logit_chunk:
        variants.append(("unchunked loss (logit_chunk=None)",
                         one.replace(step_cfg=setup.step_cfg.replace(logit_chunk=None))))
    # cuDNN only compiles for GPUs; splash is a TPU kernel (interpreted, and meaningless, elsewhere).
    native = {"cudnn": "gpu", "splash": "tpu"}
    for impl in ("blocked", "xla", "cudnn", "splash"):
        if impl != m.attn_impl and native.get(impl, target.kind) == target.kind:
            variants.append((f"attn_impl={impl}", one.replace(model=m.replace(attn_impl=impl))))
    for label, s in variants:
        ph = train_phase(s)
        out.append((label, compile_program(label, ph.lower, target)))
    return out


def suggest(setup: PlanSetup, target: Target, budget: Budget, results: Sequence[PhaseResult],
            mean_response: float | None = None) -> dict:
    """Largest micro-batch (rows/device) at the configured sampler batch, and largest
    sampler batch at the configured micro-batch, each checked against every phase (a
    kept KV cache grows with the sampler batch and sits beside the updates). With the
    continuous engine, the largest slot count instead, its pool sized to `mean_response`
    (`plan_continuous.planned_pool_pages`): the pool lives inside the sampler program."""
    out: dict[str, Any] = {}
    shards = setup.batch_shards
    base = {r.phase.name: r.total for r in results}  # the plan's own phases: probes already made

    def train_total(k: int) -> int:
        ph = train_phase(setup.replace(micro_batch_tokens=k * shards * setup.row_len))
        c = compile_program(f"train {k}", ph.lower, target)
        return _probed(f"train step at {k} row(s)/device", ph.resident_bytes + c.total, budget.bytes, c.compile_s)

    # A plan of some phases only (`--phases`) searches those only; the others' probes would
    # each cost a compile the user asked to skip (a Qwen3-4B train step: 4-10 min here).
    if "train step" in base:
        k0 = max(1, setup.rows_per_micro // shards)
        known = {k0: base["train step"]} if k0 * shards * setup.row_len == setup.micro_batch_tokens else {}
        k, _ = suggest_linear(train_total, budget.bytes, k0, known=known)
        out["rows_per_device"] = k
        out["micro_batch_tokens"] = k * shards * setup.row_len if k else None
    if "sampler" not in base:
        return out
    if setup.engine == "continuous":
        out.update(suggest_slots(setup, target, budget, mean_response, base.get("sampler")))
        return out
    unit = setup.sampler_batch_shards  # prompts split over the sampler's batch shards
    others = [r for r in results if r.phase.name != "sampler"]

    def beside(s: PlanSetup) -> int:  # the other phases, with this sampler batch's kept cache
        kv = sampler_cache_bytes(s) if setup.sampler_cache_kept else 0
        return max((r.compiled.total + r.phase.resident_bytes - r.phase.kv_bytes + kv for r in others), default=0)

    def sampler_total(j: int) -> int:
        s = setup.replace(sampler_batch=j * unit)
        ph = sampler_phase(s)
        c = compile_program(f"sampler {j}", ph.lower, target)
        return _probed(f"sampler at {j * unit} prompts", max(beside(s), ph.resident_bytes + c.total), budget.bytes,
                       c.compile_s)

    j0 = max(1, setup.sampler_batch // unit)
    known = {j0: max(beside(setup), base["sampler"])} if j0 * unit == setup.sampler_batch else {}
    j, _ = suggest_linear(sampler_total, budget.bytes, j0, known=known)
    out["sampler_batch"] = j * unit if j else None
    return out


SLOT_UNIT = 8  # slots are searched in multiples of 8 (rows of a decode step's matmuls)


def suggest_slots(setup: PlanSetup, target: Target, budget: Budget, mean_response: float | None = None,
                  measured: int | None = None) -> dict:
    """Largest continuous-engine slot count whose sampler phase fits, pool sized to the mean
    response. `measured`: the plan's own sampler phase total, reused when its slots and pool
    are a probe's."""
    from oisd_jax import plan_continuous as pc
    mean = mean_response if mean_response is not None else pc.default_mean_response(setup.max_new_tokens)
    requests = setup.sampler_batch * setup.spec.sampler.sampling.n

    def at(j: int) -> PlanSetup:
        slots = j * SLOT_UNIT
        return setup.replace(slots=slots, pool_pages=pc.planned_pool_pages(setup, slots, mean))

    def total(j: int) -> int:
        ph = sampler_phase(at(j))
        c = compile_program(f"sampler {j * SLOT_UNIT} slots", ph.lower, target)
        return _probed(f"sampler at {j * SLOT_UNIT} slots", ph.resident_bytes + c.total, budget.bytes, c.compile_s)

    top = max(1, -(-requests // SLOT_UNIT))  # more slots than requests never run
    j0 = min(top, max(1, setup.slots // SLOT_UNIT))
    probe0 = at(j0)
    known = {j0: measured} if measured is not None and (probe0.slots, probe0.pool_pages) == \
        (setup.slots, setup.pool_pages) else {}
    j, _ = suggest_linear(total, budget.bytes, j0, max_calls=5, max_value=top, known=known)
    return dict(slots=j * SLOT_UNIT if j else None, pool_pages=at(j).pool_pages if j else None)
