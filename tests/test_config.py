"""Config files, validation messages and algorithm resolution (no model module needed)."""
import json
import pathlib

import ml_collections
import pytest

from oisd_jax.config import ALGORITHMS, LOSS_AGGS, AlgorithmSettings, ConfigError, algorithm_settings, validate
from oisd_jax.config_files import apply_arg, load_config_file

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
# Blocks of each shipped config's model (from the models' published config.json files).
SHIPPED = {"base": 4, "tiny": 4, "qwen3_4b": 36, "qwen3_8b": 36, "octothinker_3b": 28,
           "octothinker_8b": 32, "smollm2_135m": 30}


def load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    spec = str(CONFIGS / f"{name}.py") + (f":{arg}" if arg else "")
    return load_config_file(spec)


def problems(config, **kw) -> list[str]:
    kw.setdefault("num_layers", 4)
    kw.setdefault("check_paths", False)
    with pytest.raises(ConfigError) as e:
        validate(config, **kw)
    assert isinstance(e.value, ValueError)
    return e.value.problems


def test_every_config_file_is_shipped_and_tested():
    files = {p.stem for p in CONFIGS.glob("*.py") if not p.stem.startswith("_")}
    assert files == set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_load_and_validate(name):
    c = load(name)
    validate(c, num_layers=SHIPPED[name], num_devices=8, check_paths=False)
    assert c.is_locked
    # every field of base exists in the model config with the same type of value
    base = load("base").to_dict()
    flat = lambda d, p="": {f"{p}{k}": v for kk, vv in d.items()
                            for k, v in (flat(vv, f"{kk}.").items() if isinstance(vv, dict)
                                         and kk != "eval_sets" else [(kk, vv)])}
    assert set(flat(c.to_dict())) == set(flat(base))
    json.loads(c.to_json_best_effort())  # checkpointable as JSON


def test_tiny_validates_with_paths_checked():
    validate(load("tiny"), num_layers=4, num_devices=8, check_paths=True)


@pytest.mark.parametrize("name,tap,max_new", [("qwen3_4b", 6, 8192), ("qwen3_8b", 6, 8192),
                                               ("octothinker_3b", 27, 3072),
                                               ("octothinker_8b", 27, 3072)])
def test_paper_settings(name, tap, max_new):
    c = load(name)
    assert (c.rl.algorithm, c.rl.tap_layer, c.sampler.max_new_tokens) == ("oisd", tap, max_new)
    assert (c.optim.lr, c.train.prompts_per_step, c.sampler.n, c.train.mini_batch_prompts) == \
        (1e-6, 128, 8, 32)
    assert (c.data.max_prompt_len, c.sampler.temperature, c.sampler.top_p, c.train.steps) == \
        (1024, 1.0, 1.0, 300)
    assert c.train.reward == "verl_math"  # BuPO's verl fork scores all five data files with math.compute_score
    assert (c.rl.clip_low, c.rl.clip_high, c.rl.dual_clip, c.rl.kl_coef) == (0.2, 0.2, 10.0, 0.0)
    assert (c.model.dtype, c.model.param_dtype) == ("bfloat16", "float32")
    assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.grad_clip) == \
        (0.9, 0.999, 0.01, 1.0)
    assert {k: v.k for k, v in c.data.eval_sets.items()} == \
        {"aime24": 32, "aime25": 32, "amc23": 16, "math500": 16}


def test_config_argument():
    c = load("qwen3_4b", "grpo")
    assert c.rl.algorithm == "grpo" and algorithm_settings(c).loss_agg == "token-mean"
    c = load("tiny", "dr_grpo")  # Dr.GRPO's constant normaliser, from rl.algorithm alone
    assert c.rl.algorithm == "dr_grpo" and algorithm_settings(c).loss_agg == "seq-mean-token-sum-norm"
    c = load("tiny", "dr_grpo,rl.loss_agg=token-mean")
    assert algorithm_settings(c).loss_agg == "token-mean"
    c = load("tiny", "bupo,rl.tap_layer=3,mesh.shape=(2,-1,2),rl.loss_agg=seq-mean-token-mean,"
                     "model.hf_path='/x'")
    assert (c.rl.algorithm, c.rl.tap_layer, c.mesh.shape, c.rl.loss_agg, c.model.hf_path) == \
        ("bupo", 3, (2, -1, 2), "seq-mean-token-mean", "/x")
    with pytest.raises(ConfigError, match="no such field"):
        load("tiny", "rl.think_wieght=0.5")
    with pytest.raises(ConfigError, match="not an algorithm"):
        load("tiny", "ppo")
    with pytest.raises(AttributeError):  # locked: a typo in code fails too
        load("tiny").rl.think_wieght = 0.5


def test_tap_layer_range():
    msg = "rl.tap_layer=40 is out of range 1..35 for a 36-layer model"
    assert problems(load("qwen3_4b", "rl.tap_layer=40"), num_layers=36) == [msg]
    # the last block has no student: its lens is the teacher itself
    assert problems(load("tiny", "rl.tap_layer=4"), num_layers=4) == \
        ["rl.tap_layer=4 is out of range 1..3 for a 4-layer model"]
    assert problems(load("tiny", "rl.tap_layer=0"), num_layers=4) == \
        ["rl.tap_layer=0 is out of range 1..3 for a 4-layer model"]
    for algo in ("bupo", "oisd_attn_only", "oisd_think_only", "oisd"):
        c = load("base", algo)  # base has no tap layer
        assert problems(c) == [f"rl.tap_layer must be set for rl.algorithm={algo!r} (the student layer)"]
    validate(load("base", "grpo"), num_layers=4)  # GRPO needs none ...
    # ... unless it logs OISD's divergences
    assert problems(load("base", "grpo,rl.oisd_metrics=True")) == \
        ["rl.tap_layer must be set for rl.oisd_metrics=True (the student layer)"]
    assert problems(load("base", "grpo,rl.oisd_metrics=True,rl.tap_layer=9")) == \
        ["rl.tap_layer=9 is out of range 1..3 for a 4-layer model"]


def test_num_layers_from_hf_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 6}))
    c = load("tiny", f"model.hf_path='{tmp_path}',rl.tap_layer=6")
    with pytest.raises(ConfigError, match=r"rl.tap_layer=6 is out of range 1..5 for a 6-layer"):
        validate(c, check_paths=True)


def test_enum_errors():
    c = load("tiny", "rl.loss_agg=token-sum,model.attn_impl=flash,data.format=csv,rl.kl_type=k4")
    got = problems(c)
    assert "rl.loss_agg='token-sum' is not one of ('token-mean', 'seq-mean-token-mean', " \
           "'seq-mean-token-sum', 'seq-mean-token-sum-norm')" in got
    assert any(p.startswith("model.attn_impl='flash' is not one of") for p in got)
    assert any(p.startswith("data.format='csv' is not one of") for p in got)
    assert any(p.startswith("rl.kl_type='k4' is not one of") for p in got)
    assert len(got) == 4
    with pytest.raises(ConfigError, match="rl.algorithm='ppo' is not one of"):
        validate(load("tiny", "rl.algorithm='ppo'"), num_layers=4)
    with pytest.raises(ConfigError, match="rl.adv_estimator='gae'"):
        validate(load("tiny", "rl.adv_estimator=gae"), num_layers=4)


def test_mesh_errors():
    assert problems(load("tiny", "mesh.shape=(3,-1,1)"), num_devices=8) == \
        ["mesh.shape=(3, -1, 1): 8 devices are not divisible by the fixed axes' product 3"]
    assert problems(load("tiny", "mesh.shape=(2,2,1)"), num_devices=8) == \
        ["mesh.shape=(2, 2, 1) needs 4 devices, but 8 are available"]
    assert problems(load("tiny", "mesh.shape=(-1,-1,1)")) == \
        ["mesh.shape=(-1, -1, 1): axes must be >= 1, with at most one -1 (= the rest)"]
    assert problems(load("tiny", "mesh.shape=(1,8)")) == \
        ["mesh.shape=(1, 8) must be 3 integers ('data', 'fsdp', 'tensor')"]
    validate(load("tiny", "mesh.shape=(2,-1,2)"), num_layers=4, num_devices=8)
    # the sampler layout has its own check, and its batch must split over data x fsdp
    assert problems(load("tiny", "mesh.sampler_shape=(1,1,4)"), num_devices=8) == \
        ["mesh.sampler_shape=(1, 1, 4) needs 4 devices, but 8 are available"]
    assert problems(load("tiny", "sampler.batch_size=3,sampler.n=2"), num_devices=8) == \
        ["sampler.batch_size * sampler.n = 6 rollouts are not divisible by the sampler mesh's "
         "data x fsdp = 8 devices"]
    validate(load("tiny", "sampler.batch_size=3,sampler.n=2,mesh.sampler_shape=(1,2,4)"),
             num_layers=4, num_devices=8)


def test_divisibility_and_sizes():
    assert problems(load("tiny", "train.prompts_per_step=16,train.mini_batch_prompts=6")) == \
        ["train.prompts_per_step=16 is not divisible by train.mini_batch_prompts=6"]
    got = problems(load("tiny", "sampler.n=0,sampler.top_p=1.5,sampler.temperature=0.0,"
                                "rl.clip_low=1.0,rl.dual_clip=1.0,optim.lr=-1e-6,sampler.top_k=-1,"
                                "sampler.decode_segments=0"))
    assert got == ["sampler.n=0 must be >= 1", "sampler.temperature=0.0 must be > 0",
                   "sampler.top_p=1.5 must be <= 1", "sampler.top_k=-1 must be >= 0",
                   "sampler.decode_segments=0 must be >= 1",
                   "rl.clip_low=1.0 must be < 1", "rl.dual_clip=1.0 must be > 1",
                   "optim.lr=-1e-06 must be > 0"]
    # ConfigDict's type safety stops 2.5 on the command line; a config built in code may not
    d = load("tiny").to_dict()
    d["train"]["steps"], d["optim"]["lr"], d["rl"]["lens_norm"] = 2.5, "1e-6", 1
    assert problems(ml_collections.ConfigDict(d)) == \
        ["rl.lens_norm=1 must be True or False", "optim.lr='1e-6' must be a number",
         "train.steps=2.5 must be an integer"]
    del d["rl"]["tau"]
    assert "rl.tau is missing" in problems(ml_collections.ConfigDict(d))
    assert problems(load("tiny", "rl.micro_batch_tokens=40")) == \
        ["rl.micro_batch_tokens=40 is smaller than one sequence (data.max_prompt_len + "
         "sampler.max_new_tokens = 64)"]
    assert problems(load("tiny", "oisd_attn_only,rl.attn_weight=0.0")) == \
        ["rl.attn_weight must be > 0 for rl.algorithm='oisd_attn_only'"]
    assert problems(load("tiny", "bupo,rl.bupo_steps=0")) == \
        ["rl.bupo_steps must be > 0 for rl.algorithm='bupo' (0 is plain GRPO)"]


def test_missing_paths(tmp_path):
    got = problems(load("qwen3_4b"), num_layers=36, check_paths=True)
    assert got == ["model.hf_path='/path/to/Qwen3-4B' does not exist",
                   "data.train_path='/path/to/data/deepmath-5k.parquet' does not exist",
                   "data.eval_sets.aime24.path='/path/to/data/aime_2024.parquet' does not exist",
                   "data.eval_sets.aime25.path='/path/to/data/aime_2025.parquet' does not exist",
                   "data.eval_sets.amc23.path='/path/to/data/amc2023.parquet' does not exist",
                   "data.eval_sets.math500.path='/path/to/data/math500.parquet' does not exist"]
    # the same config validates once the files exist
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 36}))
    for f in ("deepmath-5k", "aime_2024", "aime_2025", "amc2023", "math500"):
        (tmp_path / f"{f}.parquet").write_bytes(b"")
    c = load("qwen3_4b", f"model.hf_path='{model}'")
    with c.unlocked():
        c.data.train_path = str(tmp_path / "deepmath-5k.parquet")
        for name, es in c.data.eval_sets.items():
            es.path = es.path.replace("/path/to/data", str(tmp_path))
    validate(c, num_devices=8)
    # a folder without config.json, a file where a folder is expected, a tokenizer folder
    (tmp_path / "empty").mkdir()
    c = load("tiny", f"model.hf_path='{tmp_path / 'empty'}',model.tokenizer_path='{tmp_path}/nope',"
                     f"train.init_from_hf='{tmp_path / 'deepmath-5k.parquet'}'")
    assert problems(c, check_paths=True) == [
        f"model.hf_path='{tmp_path / 'empty'}' has no config.json",
        f"model.tokenizer_path='{tmp_path}/nope' does not exist",
        f"train.init_from_hf='{tmp_path / 'deepmath-5k.parquet'}' is not a folder"]


def test_real_data_needs_paths_and_tokenizer():
    got = problems(load("tiny", "data.format=jsonl"))
    assert got == ["data.train_path is required for data.format='jsonl'",
                   "data.format='jsonl' needs a real tokenizer: set model.hf_path or "
                   "model.tokenizer_path (the synthetic tokenizer only covers the synthetic task)",
                   "data.eval_sets.synthetic.path is None: only the synthetic task has built-in "
                   "eval problems"]
    assert problems(load("qwen3_4b", "data.format=jsonl"), num_layers=36) == [
        "data.train_path='/path/to/data/deepmath-5k.parquet' does not end with ('.jsonl', "
        "'.json') (data.format='jsonl')"]


def test_all_problems_reported_in_one_message():
    # the decode mesh = the train mesh (1, 6, 1): 128 x 8 rollouts do not split over 6 devices
    c = load("qwen3_4b", "rl.tap_layer=99,rl.loss_agg=sum,train.mini_batch_prompts=48,mesh.sampler_shape=None")
    with pytest.raises(ConfigError) as e:
        validate(c, num_layers=36, num_devices=6, check_paths=False)
    text = str(e.value)
    assert text.startswith("invalid config (4 problems):")
    for field in ("rl.tap_layer=99", "rl.loss_agg='sum'", "train.prompts_per_step=128",
                  "data x fsdp = 6 devices"):
        assert field in text


def test_algorithm_settings():
    expect = {  # algorithm -> (adv, think on, attn on, bupo on)
        "grpo": ("grpo", 0, 0, 0), "rloo": ("rloo", 0, 0, 0),
        "reinforce_pp": ("reinforce_pp", 0, 0, 0), "dr_grpo": ("dr_grpo", 0, 0, 0),
        "bupo": ("grpo", 0, 0, 1), "oisd": ("grpo", 1, 1, 0),
        "oisd_think_only": ("grpo", 1, 0, 0), "oisd_attn_only": ("grpo", 0, 1, 0), "opsd": ("grpo", 0, 0, 0),
        "ogls_sd": ("grpo", 0, 0, 0)}
    assert set(expect) == set(ALGORITHMS)
    for algo, (adv, think, attn, bupo) in expect.items():
        s = algorithm_settings(load("tiny", f"{algo},rl.think_weight=0.5,rl.attn_weight=0.25"))
        assert isinstance(s, AlgorithmSettings) and s.algorithm == algo
        assert (s.adv_estimator, s.think_weight, s.attn_weight) == (adv, 0.5 * think, 0.25 * attn)
        assert (s.use_think, s.use_attn, s.use_bupo) == (bool(think), bool(attn), bool(bupo))
        assert s.tap_layer == (2 if think or attn or bupo else None)
        assert s.bupo_steps == (10 if bupo else 0)
        hash(s)  # usable as a jit static argument
    s = algorithm_settings(load("tiny", "bupo"))
    assert s.lens_norm is False and s.bupo_active(9) and not s.bupo_active(10)
    assert algorithm_settings(load("tiny", "oisd")).lens_norm is True
    assert algorithm_settings(load("tiny", "grpo,rl.adv_estimator=rloo")).adv_estimator == "rloo"
    # OPSD: pg weight 0, OPSD weight 1 by default; weights combine any algorithm with OPSD
    s = algorithm_settings(load("tiny", "opsd"))
    assert (s.pg_weight, s.opsd_weight, s.use_opsd) == (0.0, 1.0, True)
    s = algorithm_settings(load("tiny", "oisd,rl.opsd_weight=0.5,rl.pg_weight=0.8"))
    assert (s.pg_weight, s.opsd_weight, s.use_think) == (0.8, 0.5, True)
    assert (algorithm_settings(load("tiny", "grpo")).pg_weight, algorithm_settings(load("tiny", "grpo")).opsd_weight) \
        == (1.0, 0.0)
    # OGLS-SD: OPSD's weights, the steering scale only for it
    s = algorithm_settings(load("tiny", "ogls_sd,rl.ogls_alpha=0.5"))
    assert (s.pg_weight, s.opsd_weight, s.ogls_alpha) == (0.0, 1.0, 0.5)
    assert algorithm_settings(load("tiny", "opsd,rl.ogls_alpha=0.5")).ogls_alpha is None


def test_kl_coef_needs_the_frozen_reference():
    validate(load("tiny", "rl.kl_coef=0.01"), num_layers=4, check_paths=False)  # the frozen weights in the state
    assert problems(load("tiny", "rl.kl_coef=0.01,rl.teacher=current")) == [
        "rl.kl_coef=0.01 needs rl.teacher='frozen' (the KL is to the initial policy), got 'current'"]


def test_loss_agg_names_are_the_losses_modules():
    from oisd_jax.rl import losses
    assert LOSS_AGGS == losses.AGG_MODES  # config.py stays a leaf, so the list is written twice


def test_apply_arg_locks_a_plain_configdict():
    c = apply_arg(ml_collections.ConfigDict({"rl": {"algorithm": "grpo", "loss_agg": "x"}}),
                  "oisd")
    assert c.is_locked and c.rl.algorithm == "oisd"


def test_field_mapping_and_synthetic_knobs():
    assert problems(load("tiny", "data.question_field=question")) == [
        "data.prompt_field='prompt' and data.question_field='question': set exactly one "
        "(chat-message prompts, or plain questions)"]
    validate(load("tiny", "data.question_field=question,data.prompt_field=None,"
                          "data.system_prompt=None"), num_layers=4)
    assert problems(load("tiny", "data.synthetic.ops='+/',data.synthetic.num_terms=1")) == [
        "data.synthetic.num_terms=1 must be >= 2",
        "data.synthetic.ops='+/' must be a non-empty string of '+-*'"]
    # prose examples need a tokenizer that spells prose; the synthetic one is refused by name
    assert problems(load("tiny", "data.synthetic.few_shot=2")) == [
        "data.synthetic.few_shot=2 writes its examples in prose, which the synthetic tokenizer "
        "cannot spell: set model.hf_path or model.tokenizer_path, or few_shot=0"]
    assert problems(load("tiny", "data.synthetic.few_shot=-1")) == ["data.synthetic.few_shot=-1 must be >= 0"]
    assert problems(load("tiny", "data.synthetic.prose=verbose")) == [
        "data.synthetic.prose='verbose' is not one of ('brief', 'running_total')"]
    assert problems(load("tiny", "data.synthetic.prose=running_total,data.synthetic.ops=+*")) == [
        "data.synthetic.prose='running_total' works left to right, which is the order of operations only "
        "without '*': data.synthetic.ops='+*' (use '+', '-' or '+-', or prose='brief')"]


def test_num_layers_from_the_model_preset():
    model_config = pytest.importorskip("oisd_jax.model.config")
    from oisd_jax import config as oc
    # the enums are copied (config.py must not import the model): keep them equal
    assert (oc.REMAT_POLICIES, oc.ATTN_IMPLS) == (model_config.REMAT_POLICIES, model_config.ATTN_IMPLS)
    with pytest.raises(ConfigError, match="rl.tap_layer=4 is out of range 1..3 for a 4-layer"):
        validate(load("tiny", "rl.tap_layer=4"))
    with pytest.raises(ConfigError, match="model: cannot resolve the number of layers"):
        validate(load("tiny", "model.preset=huge"))


def test_command_line_overrides_with_config_flags():
    """The trainer's path: ml_collections config_flags with --config.a.b=value overrides."""
    from absl import flags
    from ml_collections import config_flags
    argv = ["prog", f"--config={CONFIGS / 'base.py'}:oisd", "--config.rl.tap_layer=3",
            "--config.model.hf_path=/some/where", "--config.mesh.shape=(2,-1,1)",
            "--config.rl.think_weight=0.05", "--config.data.eval_sets.synthetic.path=/e.jsonl"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, sys_argv=argv)
    fv(argv)
    c = fv.config
    assert (c.rl.algorithm, c.rl.tap_layer, c.model.hf_path, c.mesh.shape, c.rl.think_weight,
            c.data.eval_sets.synthetic.path) == ("oisd", 3, "/some/where", (2, -1, 1), 0.05,
                                                 "/e.jsonl")
