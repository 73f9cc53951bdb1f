"""StepConfig: everything the compiled RL update needs besides the model shape.

Its own module so the step (rl/step.py) and the micro-batch loss (rl/step_loss.py) both
read it without importing each other.
"""
from __future__ import annotations

import dataclasses

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
    pg_weight: float = 1.0            # 1 always in training; 0 isolates the OISD terms
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
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"StepConfig.schedule={self.schedule!r}: constant | cosine")
        needs_tap = self.think_on or self.attn_on or self.bupo or self.oisd_metrics
        if needs_tap and self.tap_layer is None:
            raise ValueError("StepConfig.tap_layer is required for OISD terms, their metrics, or BuPO")
        if self.bupo and (self.think_on or self.attn_on or self.oisd_metrics):
            raise ValueError("StepConfig: bupo (internal-policy L_pg) does not combine with OISD terms")
        if self.dual_clip is not None and self.dual_clip <= 1.0 + self.clip_high:
            raise ValueError(f"StepConfig.dual_clip={self.dual_clip} must exceed 1 + clip_high")

    @property
    def think_on(self) -> bool:
        return self.think_weight != 0

    @property
    def attn_on(self) -> bool:
        return self.attn_weight != 0

    @property
    def think_metrics(self) -> bool:
        return self.oisd_metrics

    @property
    def attn_metrics(self) -> bool:
        return self.oisd_metrics

    def replace(self, **kw) -> "StepConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_config(cls, config, bupo: bool = False) -> "StepConfig":
        """From the ml_collections config (rl / optim / sampler / train sections).

        `rl.algorithm` decides which terms are on (oisd_jax.config.algorithm_settings);
        bupo=True gives the internal-policy step of BuPO's first `rl.bupo_steps` steps.
        """
        from oisd_jax.config import algorithm_settings  # a leaf module (no jax)
        s = algorithm_settings(config)
        if bupo and not s.use_bupo:
            raise ValueError(f"bupo=True but rl.algorithm={s.algorithm!r} is not bupo")
        rl, o, t = config.rl, config.optim, config.train
        updates = int(t.steps) * max(1, int(t.prompts_per_step) // int(t.mini_batch_prompts)) \
            * int(rl.get("ppo_epochs", 1))
        return cls(
            temperature=float(config.sampler.temperature), clip_low=float(rl.clip_low),
            clip_high=float(rl.clip_high),
            dual_clip=None if rl.dual_clip is None else float(rl.dual_clip),
            ratio_log_clamp=float(rl.ratio_log_clamp), loss_agg=s.loss_agg,
            loss_norm_len=float(config.sampler.max_new_tokens) if s.loss_agg == "seq-mean-token-sum-norm" else None,
            kl_coef=float(rl.kl_coef), kl_type=rl.kl_type, entropy_coef=float(rl.entropy_coef),
            tap_layer=s.tap_layer, think_weight=s.think_weight, attn_weight=s.attn_weight,
            tau=float(rl.tau), adv_clip=float(rl.adv_clip), lens_norm=bool(rl.lens_norm),
            oisd_metrics=s.oisd_metrics and not bupo,  # BuPO's internal-policy phase has its own lens
            bupo=bupo, bupo_lens_norm=bool(rl.bupo_lens_norm),
            logit_chunk=None if not rl.logit_chunk else int(rl.logit_chunk),
            lr=float(o.lr), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
            weight_decay=float(o.weight_decay), grad_clip=float(o.grad_clip),
            skip_nonfinite=bool(o.get("skip_nonfinite", True)), schedule=o.schedule,
            warmup_steps=int(o.warmup_steps), decay_steps=updates,
            end_lr_factor=float(o.get("end_lr_factor", 0.0)))
