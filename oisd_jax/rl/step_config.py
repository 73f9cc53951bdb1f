"""StepConfig: everything the compiled RL update needs besides the model shape.

Its own module so the step (rl/step.py) and the micro-batch loss (rl/step_loss.py) both
read it without importing each other. A run's StepConfig is built from its config once,
by oisd_jax.run_spec.resolve (RunSpec.step / bupo_step).
"""
from __future__ import annotations

import dataclasses

from oisd_jax.choices import SCHEDULES, TEACHERS
from oisd_jax.rl import losses


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything the compiled update needs besides the model shape (hashable, static)."""
    temperature: float = 1.0          # T_s: log-probs of logits / T_s
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 10.0
    ratio_log_clamp: float = 20.0
    loss_agg: str = "token-mean"      # one of losses.AGG_MODES (verl's names)
    loss_norm_len: float | None = None  # seq-mean-token-sum-norm's constant (Dr.GRPO: max response)
    kl_coef: float = 0.0              # > 0 needs batch.ref_logp
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    pg_weight: float = 1.0            # weight of L_pg; 0 for OPSD alone (or to isolate the OISD terms)
    opsd_weight: float = 0.0          # weight of OPSD's generalised JSD to the teacher; needs teacher rows
    opsd_beta: float = 0.0            # its beta: 0 forward KL(T||S), 1 reverse KL(S||T), TRL's convention
    opsd_token_clip: float | None = None  # clamp of each per-vocabulary-entry term; None = off
    opsd_top_k: int | None = None     # both distributions over the teacher's top k; None = full vocabulary
    # OGLS-SD (rl/steer_pass.py): the OPSD target is the teacher steered by alpha times its
    # correct-minus-incorrect pool means per group; None = plain OPSD (0 = steering by 0).
    ogls_alpha: float | None = None
    ogls_unit: str = "token"          # one vote in a pool mean: a response token | a rollout (STEER_UNITS)
    ogls_groups: int = 0              # groups (prompts) per mini-batch: the static size of the pools
    teacher: str = "frozen"           # OPSD teacher / KL reference: frozen | ema | current (TEACHERS)
    teacher_decay: float = 0.999      # ema: teacher <- d teacher + (1 - d) params after each update
    tap_layer: int | None = None      # l (1-based) for OISD / BuPO
    think_weight: float = 0.0         # lambda_think
    attn_weight: float = 0.0          # lambda_attn
    tau: float = 1.0
    adv_clip: float = 1.0             # c in w = clip(A, -c, c)
    lens_norm: bool = True
    oisd_metrics: bool = False        # log think/attention JS even when their weight is 0
    bupo: bool = False                # L_pg on pi_l = softmax(W_U h_l / T_s)
    bupo_lens_norm: bool = False
    logit_chunk: int | None = 1024    # tokens of T per vocabulary chunk; None = unchunked
    fused_head: bool = True           # gradient-in-forward vocabulary head (see step_loss)
    lr: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0            # 0 = off
    skip_nonfinite: bool = True
    schedule: str = "constant"        # constant | cosine (after linear warm-up)
    warmup_steps: int = 0
    decay_steps: int = 0              # cosine: optimizer updates over which to decay
    end_lr_factor: float = 0.0

    def __post_init__(self):
        if self.loss_agg not in losses.AGG_MODES:
            raise ValueError(f"StepConfig.loss_agg={self.loss_agg!r}: choose from {losses.AGG_MODES}")
        if (self.loss_agg == "seq-mean-token-sum-norm") != (self.loss_norm_len is not None):
            raise ValueError(f"StepConfig.loss_norm_len={self.loss_norm_len} with loss_agg={self.loss_agg!r}: "
                             "seq-mean-token-sum-norm needs it, the other modes take none")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"StepConfig.schedule={self.schedule!r}: constant | cosine")
        needs_tap = self.think_on or self.attn_on or self.bupo or self.oisd_metrics
        if needs_tap and self.tap_layer is None:
            raise ValueError("StepConfig.tap_layer is required for OISD terms, their metrics, or BuPO")
        if self.bupo and (self.think_on or self.attn_on or self.oisd_metrics):
            raise ValueError("StepConfig: bupo (internal-policy L_pg) does not combine with OISD terms")
        if self.teacher not in TEACHERS:
            raise ValueError(f"StepConfig.teacher={self.teacher!r}: choose from {TEACHERS}")
        if self.kl_coef and self.teacher != "frozen":
            raise ValueError(f"StepConfig.kl_coef={self.kl_coef} needs teacher='frozen' (the KL is to the initial "
                             f"policy), got {self.teacher!r}")
        if self.bupo and self.opsd_on:
            raise ValueError("StepConfig: bupo (internal-policy L_pg) does not combine with OPSD")
        if self.steer_on and (not self.opsd_on or self.ogls_groups < 1 or self.ogls_unit not in losses.STEER_UNITS):
            raise ValueError(f"StepConfig.ogls_alpha={self.ogls_alpha} needs opsd_weight != 0, ogls_groups >= 1 "
                             f"(got {self.ogls_groups}) and ogls_unit in {losses.STEER_UNITS} (got {self.ogls_unit!r})")
        if not 0.0 <= self.opsd_beta <= 1.0:
            raise ValueError(f"StepConfig.opsd_beta={self.opsd_beta} must be in [0, 1]")
        if self.dual_clip is not None and self.dual_clip <= 1.0 + self.clip_high:
            raise ValueError(f"StepConfig.dual_clip={self.dual_clip} must exceed 1 + clip_high")

    @property
    def think_on(self) -> bool:
        return self.think_weight != 0

    @property
    def attn_on(self) -> bool:
        return self.attn_weight != 0

    @property
    def opsd_on(self) -> bool:
        return self.opsd_weight != 0

    @property
    def steer_on(self) -> bool:
        """OGLS-SD: a first pass makes the steering direction; the OPSD target is steered."""
        return self.ogls_alpha is not None

    @property
    def ref_resident(self) -> bool:
        """Whether the train state holds a second copy of the weights (TrainState.ref_params):
        the KL reference, or a frozen / EMA OPSD teacher ('current' reuses the params)."""
        return bool(self.kl_coef) or (self.opsd_on and self.teacher != "current")

    @property
    def think_metrics(self) -> bool:
        return self.oisd_metrics

    @property
    def attn_metrics(self) -> bool:
        return self.oisd_metrics

    def replace(self, **kw) -> "StepConfig":
        return dataclasses.replace(self, **kw)
