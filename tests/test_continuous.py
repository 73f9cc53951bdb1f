"""Per-rollout budgets, scheduling-independent keys, and the continuous engine over paged KV
against the static engine (token for token), pool exhaustion, mesh, paged attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import save_hf_model
from oisd_jax import parallel
from oisd_jax.model import ModelConfig, load_hf, paged
from oisd_jax.sampler import Sampler, SamplingParams


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param + "_c")
    save_hf_model(request.param, path, seed=7)
    cfg, params = load_hf(path, dtype=jnp.float32)
    return request.param, cfg, params


def case(cfg, seed=0, n=3, N=20):
    """Prompts of uneven lengths, uneven budgets, and EOS ids frequent enough to end some rows first."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, cfg.vocab_size, k) for k in (3, 10, 6, 1)]
    budgets = rng.integers(1, N + 1, len(prompts) * n)
    budgets[0] = N
    eos = tuple(range(3, 3 + cfg.vocab_size // 12))
    return prompts, budgets, eos


def assert_same(out, ref, atol=1e-5):
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=atol)


# ----------------------------------------------------------------------------- static engine
def test_budgets_end_rows_like_eos(pair):
    _, cfg, params = pair
    N, n = 20, 3
    prompts, budgets, eos = case(cfg, 1, n, N)
    s = Sampler(cfg, 12, N, prompt_bucket=8, kv_dtype=jnp.float32)
    sp = SamplingParams(temperature=1.1, n=n, eos_ids=eos)
    full = s.generate(params, prompts, jax.random.key(3), sp)
    out = s.generate(params, prompts, jax.random.key(3), sp, budgets=budgets)
    assert s.num_compiles == 1  # budgets are an argument, not a static
    # Keys are per position: a budget cuts the unbudgeted rollout, it changes no token.
    np.testing.assert_array_equal(out.lengths, np.minimum(full.lengths, budgets))
    cut = out.lengths < full.lengths
    assert cut.sum() >= 2 and (~cut).sum() >= 2 and (out.lengths == 1).any()
    for r in range(len(budgets)):
        L = out.lengths[r]
        np.testing.assert_array_equal(out.tokens[r, :L], full.tokens[r, :L])
        np.testing.assert_allclose(out.logprobs[r, :L], full.logprobs[r, :L], atol=1e-6)
        assert (out.tokens[r, L:] == 0).all() and (out.logprobs[r, L:] == 0).all()
    with pytest.raises(ValueError, match="budgets must lie in"):
        s.generate(params, prompts, jax.random.key(3), sp, budgets=budgets * 0)
    with pytest.raises(ValueError, match="shape"):
        s.generate(params, prompts, jax.random.key(3), sp, budgets=budgets[:-1])


def test_rollouts_keyed_by_prompt_rollout_position(pair):
    """Rollout j of prompt b is the same whatever n and whatever prompts follow it."""
    _, cfg, params = pair
    prompts, _, eos = case(cfg, 2)
    s = Sampler(cfg, 12, 8, prompt_bucket=16, kv_dtype=jnp.float32)
    a = s.generate(params, prompts, jax.random.key(5), SamplingParams(n=4, eos_ids=eos))
    b = s.generate(params, prompts[:2], jax.random.key(5), SamplingParams(n=2, eos_ids=eos))
    keep = np.array([r for r in range(4 * 4) if r // 4 < 2 and r % 4 < 2])
    np.testing.assert_array_equal(b.tokens, a.tokens[keep])
    np.testing.assert_allclose(b.logprobs, a.logprobs[keep], atol=1e-5)
    assert len({tuple(t) for t in a.tokens[:4]}) > 1  # rollouts of one prompt still differ


# ----------------------------------------------------------------------------- continuous engine
@pytest.mark.parametrize("greedy", [True, False])
def test_continuous_equals_static(pair, greedy):
    kind, cfg, params = pair
    N, n = 20, 3
    prompts, budgets, eos = case(cfg, 4, n, N)
    key = jax.random.key(9)
    static = Sampler(cfg, 12, N, prompt_bucket=8, kv_dtype=jnp.float32)
    if greedy:  # greedy rows avoid a fixed EOS set: take tokens they emit mid-way instead
        free = static.generate(params, prompts, key, SamplingParams(n=n, eos_ids=(), greedy=True))
        eos = tuple(sorted({int(free.tokens[r, 6]) for r in (0, 4, 10)}))
    sp = SamplingParams(temperature=1.1, n=n, eos_ids=eos, greedy=greedy)
    ref = static.generate(params, prompts, key, sp, budgets=budgets)
    ended_eos = np.isin(ref.tokens[np.arange(len(budgets)), ref.lengths - 1], eos)
    assert ended_eos.any() and (ref.lengths == budgets).any() and len(set(ref.lengths)) >= 4
    # Page sizes that split prompts mid-page (copy-on-write) and at page ends; fewer slots
    # than requests, so slots are refilled.
    configs = [(4, 4), (3, 8)] if kind == "qwen3" else [(5, 2), (12, 1)]
    for slots, page_size in configs:
        s = Sampler(cfg, 12, N, prompt_bucket=8, kv_dtype=jnp.float32, engine="continuous", slots=slots,
                    page_size=page_size)
        for _ in range(2):  # one program per shape
            assert_same(s.generate(params, prompts, key, sp, budgets=budgets), ref)
        assert s.num_compiles == 1
        st = s.last_stats
        assert st["preemptions"] == 0 and st["waits"] == 0  # the default pool never runs out
        # Slots are refilled: fewer steps than rows x longest rollout would need in turn.
        assert st["steps"] < ref.lengths.sum() and 0 < st["occupancy"] <= 1


def test_pool_exhaustion_waits_and_requeues(pair):
    _, cfg, params = pair
    N, n = 20, 3
    prompts, budgets, eos = case(cfg, 6, n, N)
    budgets[:] = N  # long rollouts, so the pool runs dry
    sp = SamplingParams(temperature=1.0, n=n, eos_ids=eos[:2])
    key = jax.random.key(1)
    ref = Sampler(cfg, 12, N, prompt_bucket=8, kv_dtype=jnp.float32).generate(params, prompts, key, sp,
                                                                               budgets=budgets)
    # Prompts (3, 10, 6, 1 tokens) take 1+3+2+1 = 7 pages of 4; one rollout up to 6 more.
    tight = Sampler(cfg, 12, N, prompt_bucket=8, kv_dtype=jnp.float32, engine="continuous", slots=6, page_size=4,
                    pool_pages=13)
    assert_same(tight.generate(params, prompts, key, sp, budgets=budgets), ref)
    st = tight.last_stats
    assert st["waits"] > 0 and st["preemptions"] > 0, st
    small = Sampler(cfg, 12, N, prompt_bucket=8, engine="continuous", slots=6, page_size=4, pool_pages=12)
    with pytest.raises(ValueError, match="pool_pages=12 cannot hold this call.*need pool_pages >= 13"):
        small.generate(params, prompts, key, sp, budgets=budgets)
    assert small.num_compiles == 0  # refused before compiling
    with pytest.raises(ValueError, match="engine"):
        Sampler(cfg, 12, N, engine="paged")
    with pytest.raises(ValueError, match="page_size=0"):
        Sampler(cfg, 12, N, engine="continuous", page_size=0)


def test_continuous_on_mesh_equals_one_device(pair):
    kind, cfg, params = pair
    if kind != "qwen3":
        pytest.skip("one model is enough for the layout")
    N, n = 14, 4
    prompts, budgets, eos = case(cfg, 8, n, N)
    sp = SamplingParams(temperature=0.9, n=n, eos_ids=eos)
    key = jax.random.key(2)
    kw = dict(prompt_bucket=8, kv_dtype=jnp.float32, engine="continuous", slots=8, page_size=4)
    single = Sampler(cfg, 12, N, **kw).generate(params, prompts, key, sp, budgets=budgets)
    s = Sampler(cfg, 12, N, mesh=parallel.make_mesh((2, 2, 2)), **kw)
    assert_same(s.generate(s.reshard(params), prompts, key, sp, budgets=budgets), single)


# ----------------------------------------------------------------------------- paged attention
@pytest.mark.parametrize("chunk_tokens,pages_dtype", [(32, "float32"), (4, "float32"), (8, "float32"),
                                                     (8, "bfloat16")])
def test_paged_attention_matches_dense_reference(monkeypatch, chunk_tokens, pages_dtype):
    """The gather path's chunks (32 tokens: the whole 5-page table in one; 4: one page each;
    8: two pages, the table padded to 6) and bf16 pages (widened by a bit shift)."""
    monkeypatch.setattr(paged, "GATHER_CHUNK_TOKENS", chunk_tokens)
    cfg = ModelConfig.preset("tiny")
    KV, Dh, Nh = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    rng = np.random.default_rng(0)
    pages, ps, M = 11, 4, 3
    k = rng.standard_normal((KV, pages + 1, ps, Dh)).astype(jnp.dtype(pages_dtype))
    v = rng.standard_normal((KV, pages + 1, ps, Dh)).astype(jnp.dtype(pages_dtype))
    q = rng.standard_normal((M, Nh, Dh)).astype(np.float32)
    table = np.array([[3, 0, 7, 11, 11], [5, 5, 2, 1, 9], [10, 11, 11, 11, 11]], np.int32)  # shared page 5
    lengths = np.array([10, 20, 1], np.int32)
    out = np.asarray(jax.jit(lambda *a: paged.paged_attention(*a, cfg))(q, k, v, table, lengths))
    k, v = np.asarray(k, np.float32), np.asarray(v, np.float32)
    G = Nh // KV
    for m in range(M):
        ks = np.concatenate([k[:, p] for p in table[m]], axis=1)[:, :lengths[m]]  # [KV, L, Dh]
        vs = np.concatenate([v[:, p] for p in table[m]], axis=1)[:, :lengths[m]]
        for h in range(Nh):
            s = ks[h // G] @ q[m, h] / np.sqrt(Dh)
            w = np.exp(s - s.max())
            np.testing.assert_allclose(out[m, h], w @ vs[h // G] / w.sum(), atol=1e-5)
    if (chunk_tokens, pages_dtype) != (32, "float32"):
        return
    # The Pallas GPU and TPU kernels in interpret mode (CPU) read the same pages.
    # The TPU kernel's dots run at the default precision, which rounds f32 operands to bf16
    # (its interpret mode too: measured 7.8e-3 here, 2.4e-7 on bf16 pages, below).
    for impl, atol in (("pallas_gpu", 1e-5), ("pallas_tpu", 2e-2)):
        kern = paged.paged_attention(q, k, v, table, lengths, cfg, impl=impl, interpret=True)
        np.testing.assert_allclose(np.asarray(kern), out, atol=atol, err_msg=impl)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_paged_kernels_equal_gather_uneven_bf16(impl):
    """Both kernels (interpret mode) against the gather path on bf16 pages, the width the
    engine passes (not a multiple of the kernels' block, so the table is padded), uneven
    lengths from 1 to the full table, shared and repeated pages, trash entries past each length."""
    cfg = ModelConfig.preset("tiny")
    KV, Dh, Nh = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    rng = np.random.default_rng(1)
    pages, ps, M, C = 40, 8, 6, 11
    k = jnp.asarray(rng.standard_normal((KV, pages + 1, ps, Dh)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((KV, pages + 1, ps, Dh)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((M, Nh, Dh)), jnp.float32)
    lengths = np.array([1, C * ps, 9, 37, 64, 8], np.int32)
    table = np.full((M, C), pages, np.int32)  # trash
    for m, L in enumerate(lengths):
        used = -(-L // ps)
        table[m, :used] = rng.choice(pages, used, replace=False)
    table[2, 0] = table[3, 0] = table[4, 1]  # a page shared by three sequences
    ref = paged.paged_attention(q, k, v, table, lengths, cfg)
    out = paged.paged_attention(q, k, v, table, lengths, cfg, impl=impl, interpret=True)
    assert out.shape == ref.shape == (M, Nh, Dh) and out.dtype == q.dtype
    # The GPU kernel takes the query in the entries' dtype (bf16 here); the TPU kernel upcasts.
    atol = {"pallas_tpu": 1e-5, "pallas_gpu": 2e-2}[impl]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=atol)
    # Not vacuous: a sequence's output depends on the pages its table names.
    other = paged.paged_attention(q, k, v, table[::-1], lengths[::-1], cfg, impl=impl, interpret=True)
    assert np.abs(np.asarray(other) - np.asarray(out)).max() > 0.1


def _random_pool(cfg, rng, pages: int, ps: int, lengths, C: int):
    """bf16 pages (KV, pages + 1 with the trash page last), an f32 query per sequence and a
    table naming distinct random pages below each length, trash past it."""
    KV, Dh, Nh, M = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads, len(lengths)
    k = jnp.asarray(rng.standard_normal((KV, pages + 1, ps, Dh)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((KV, pages + 1, ps, Dh)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((M, Nh, Dh)), jnp.float32)
    table = np.full((M, C), pages, np.int32)
    for m, L in enumerate(lengths):
        table[m, :-(-L // ps)] = rng.choice(pages, -(-L // ps), replace=False)
    return q, k, v, table


def test_tpu_kernel_in_groups_of_rows_equals_gather(monkeypatch):
    """A page table over the TPU kernel's SMEM budget goes to the kernel in groups of rows
    (here 2 sequences per call, 3 calls): the same result as the gather path (interpret
    mode), uneven lengths and a page shared across groups."""
    cfg = ModelConfig.preset("tiny")
    rng = np.random.default_rng(3)
    ps, M, C = 8, 6, 11
    lengths = np.array([88, 1, 40, 9, 64, 17], np.int32)
    q, k, v, table = _random_pool(cfg, rng, 30, ps, lengths, C)
    table[5, 0] = table[0, 3]
    ref = paged.paged_attention(q, k, v, table, lengths, cfg)
    padded = -(-C // paged.PALLAS_PAGES_PER_BLOCK) * paged.PALLAS_PAGES_PER_BLOCK
    assert paged.tpu_rows_per_call(padded) >= M  # the default budget: one call
    monkeypatch.setattr(paged, "TPU_SMEM_TABLE_BYTES", 2 * 4 * padded)
    assert paged.tpu_rows_per_call(padded) == 2
    out = paged.paged_attention(q, k, v, table, lengths, cfg, impl="pallas_tpu", interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize("impl,shape", [("pallas_tpu", (2, 2, 2)), ("pallas_tpu", (1, 4, 1)), ("pallas_gpu", (1, 1, 2))])
def test_paged_kernels_under_a_mesh_equal_gather(impl, shape):
    """Under a mesh (jax.set_mesh, as the Sampler calls the engine) a kernel runs per device
    through a shard_map over KV heads (Mosaic cannot be partitioned by XLA): pools split over
    `tensor` as the engine lays them out, or replicated where `tensor` is 1; the result equals
    the gather path on one device (interpret mode)."""
    cfg = ModelConfig.preset("tiny")
    rng = np.random.default_rng(2)
    ps, C = 8, 5
    lengths = np.array([1, C * ps, 13, 30], np.int32)
    q, k, v, table = _random_pool(cfg, rng, 24, ps, lengths, C)
    ref = paged.paged_attention(q, k, v, table, lengths, cfg)
    mesh = parallel.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
    pool_sh = parallel.sharding_for(("kv_heads", None, None, None), mesh, k.shape, parallel.DECODE_RULES)
    assert pool_sh.spec[0] == ("tensor" if shape[2] > 1 else None)
    fn = jax.jit(lambda *a: paged.paged_attention(*a, cfg, impl=impl, interpret=True))
    with jax.set_mesh(mesh):
        lowered = fn.lower(q, jax.device_put(k, pool_sh), jax.device_put(v, pool_sh), table, lengths)
        assert "shard_map" in str(lowered.as_text()) or "manual" in str(lowered.as_text()).lower()
        out = lowered.compile()(q, jax.device_put(k, pool_sh), jax.device_put(v, pool_sh), table, lengths)
    atol = {"pallas_tpu": 1e-5, "pallas_gpu": 2e-2}[impl]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=atol)


def test_paged_impl_resolution():
    assert [paged.resolve_impl("auto", p) for p in ("gpu", "tpu", "cpu")] == ["pallas_gpu", "pallas_tpu", "gather"]
    assert paged.resolve_impl("gather", "gpu") == "gather" and paged.resolve_impl("pallas_tpu", "cpu") == "pallas_tpu"
    assert paged.interpreted("pallas_tpu", "cpu") and not paged.interpreted("pallas_tpu", "tpu")
    assert not paged.interpreted("gather", "cpu") and paged.interpreted("pallas_gpu", "tpu")
    # The TPU kernel's blocks need head_dim % 128 == 0: auto falls back (SmolLM2's 64), explicit does not.
    assert paged.resolve_impl("auto", "tpu", head_dim=128) == "pallas_tpu"
    assert paged.resolve_impl("auto", "tpu", head_dim=64) == "gather"
    assert paged.resolve_impl("auto", "gpu", head_dim=64) == "pallas_gpu"
    assert paged.resolve_impl("pallas_tpu", "tpu", head_dim=64) == "pallas_tpu"
    with pytest.raises(ValueError, match="impl='triton'"):
        paged.resolve_impl("triton")
    s = Sampler(ModelConfig.preset("tiny"), 8, 8, engine="continuous")
    assert s.paged_impl == "gather" and not s.paged_interpret  # auto on this CPU backend
    with pytest.raises(ValueError, match="paged_impl='triton'"):
        Sampler(ModelConfig.preset("tiny"), 8, 8, paged_impl="triton")


def test_continuous_with_tpu_kernel_equals_gather(pair):
    """The engine with the TPU kernel (interpreted on CPU), on a mesh, decodes the gather path's
    greedy rollouts (one device) on bf16 pages (the default KV dtype): refills, copy-on-write prompt pages,
    uneven budgets. (f32 pages would not do: see the kernel's precision above.) Small: the
    interpreted kernel costs ~1 min here. The GPU kernel is checked at the attention level
    only: it takes the query in the entries' dtype, so its log-probs differ at bf16 level."""
    kind, cfg, params = pair
    if kind != "qwen3":
        pytest.skip("one model is enough for the kernel path")
    impl, N, n = "pallas_tpu", 6, 2
    prompts, budgets, _ = case(cfg, 4, n, N)
    prompts = prompts[:2]  # 3 and 10 tokens: pages of 4 split both mid-page (copy-on-write)
    budgets = np.array([6, 2, 5, 3])
    key = jax.random.key(9)
    sp = SamplingParams(n=n, eos_ids=(), greedy=True)
    kw = dict(prompt_bucket=8, engine="continuous", slots=2, page_size=4)
    ref = Sampler(cfg, 12, N, paged_impl="gather", **kw).generate(params, prompts, key, sp, budgets=budgets)
    # On a 2-device mesh with KV heads over `tensor`: the kernel runs per device (shard_map).
    s = Sampler(cfg, 12, N, paged_impl=impl, mesh=parallel.make_mesh((1, 1, 2), jax.devices()[:2]), **kw)
    assert s.paged_impl == impl and s.paged_interpret
    out = s.generate(s.reshard(params), prompts, key, sp, budgets=budgets)
    assert_same(out, ref)
    assert s.last_stats["steps"] < ref.lengths.sum() and len(set(ref.lengths)) >= 3


def test_tpu_kernel_compiles_deviceless_for_v5p():
    """The TPU decode kernel through `paged_attention(impl="pallas_tpu")` lowers to a Mosaic
    custom call and XLA:TPU compiles it for one v5p chip (compile-only, libtpu; nothing
    runs), at Qwen3-4B's attention shape: 32 query / 8 KV heads of 128, bf16 pages of 16
    tokens, 64 sequences of up to 64 pages (the engine's default slots and page size)."""
    from oisd_jax import tpu_targets
    if not tpu_targets.libtpu_available():
        pytest.skip("needs libtpu: pip install -r requirements-tpu-plan.txt")
    cfg = ModelConfig.preset("tiny").replace(num_heads=32, num_kv_heads=8, head_dim=128)
    dev = tpu_targets.compile_only_devices("v5p", 1)
    sh = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(dev), ("x",)), jax.sharding.PartitionSpec())
    M, C, pages, ps = 64, 64, 2048, 16
    arg = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
    pool = arg((8, pages + 1, ps, 128), jnp.bfloat16)
    lowered = jax.jit(lambda q, k, v, t, n: paged.paged_attention(q, k, v, t, n, cfg, impl="pallas_tpu")).lower(
        arg((M, 32, 128), jnp.bfloat16), pool, pool, arg((M, C), jnp.int32), arg((M,), jnp.int32))
    assert lowered.as_text().count("@tpu_custom_call") == 1
    compiled = lowered.compile()
    assert compiled.memory_analysis().argument_size_in_bytes >= 2 * pages * ps * 8 * 128 * 2
    # Qwen3-4B's 9216-token rows at 512 slots: a 512 x 576 int32 table (1.1 MiB) is over the
    # 1 MiB of SMEM the kernel prefetches it into (one call: RESOURCE_EXHAUSTED, measured);
    # in groups of rows it compiles.
    M, C = 512, 576
    assert paged.tpu_rows_per_call(C) < M
    lowered = jax.jit(lambda q, k, v, t, n: paged.paged_attention(q, k, v, t, n, cfg, impl="pallas_tpu")).lower(
        arg((M, 32, 128), jnp.bfloat16), pool, pool, arg((M, C), jnp.int32), arg((M,), jnp.int32))
    assert lowered.as_text().count("@tpu_custom_call") == -(-M // paged.tpu_rows_per_call(C))
    lowered.compile()
    # The whole continuous rollout program with it (a 2-layer bf16 model of head_dim 128).
    from oisd_jax.model.params import abstract
    from oisd_jax.sampler_continuous import continuous_generate
    cfg = ModelConfig.preset("tiny", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=128, dtype="bfloat16")
    mesh = jax.sharding.Mesh(np.asarray(dev).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    B, P, n = 2, 32, 4
    statics = dict(cfg=cfg, n=n, greedy=False, top_k=0, max_new_tokens=48, slots=4, page_size=16, pool_pages=32,
                   kv_dtype="bfloat16", paged_impl="pallas_tpu", interpret=False)
    program = jax.jit(continuous_generate, static_argnames=tuple(statics))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sh)
    lowered = program.lower(abstract(cfg, mesh, rules=parallel.DECODE_RULES), arg((B, P), jnp.int32),
                            arg((B,), jnp.int32), arg((B * n,), jnp.int32), key, arg((), jnp.float32),
                            arg((), jnp.float32), arg((1,), jnp.int32), arg((), jnp.int32), **statics)
    assert "@tpu_custom_call" in lowered.as_text()
    lowered.compile()
    # Under 4-chip v5p meshes (a v5p-8): without the shard_map Mosaic
    # refuses to lower ("Mosaic kernels cannot be automatically partitioned").
    dev4 = tpu_targets.compile_only_devices("v5p", 4)
    for shape in ((1, 2, 2), (1, 4, 1)):  # KV heads over tensor; heads whole, 4 devices
        mesh = jax.sharding.Mesh(np.asarray(dev4).reshape(shape), ("data", "fsdp", "tensor"))
        sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        arg = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sh)  # noqa: E731
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sh)
        with jax.set_mesh(mesh):
            lowered = program.lower(abstract(cfg, mesh, rules=parallel.DECODE_RULES), arg((B, P), jnp.int32),
                                    arg((B,), jnp.int32), arg((B * n,), jnp.int32), key, arg((), jnp.float32),
                                    arg((), jnp.float32), arg((1,), jnp.int32), arg((), jnp.int32), **statics)
        text = lowered.as_text()
        assert "@tpu_custom_call" in text and ("shard_map" in text or "manual" in text.lower())
        lowered.compile()


# ----------------------------------------------------------------------------- trainer level
def test_trainer_step_with_continuous_engine_equals_static():
    """sampler.engine='continuous' through the config, the trainer's Sampler and one RL
    step: the same rollouts (texts) and step metrics as the static engine."""
    from oisd_jax import metrics
    from oisd_jax.rewards import RewardPool
    from oisd_jax.rl.train_state import init_train_state
    from oisd_jax.train import rl_step
    from oisd_jax.train_setup import build_setup, train_prompt_iterator
    from tiny_run import tiny_config
    runs = {}
    for engine in ("static", "continuous"):
        s = build_setup(tiny_config(train__steps=1, train__sft_warmup_steps=0, sampler__engine=engine,
                                    sampler__slots=3, sampler__page_size=4, sampler__kv_dtype="float32"))
        assert s.sampler.engine == engine and s.sampler.paged_impl == "gather"  # auto, on this CPU
        state = init_train_state(s.init_params(jax.random.key(0)), s.step_cfg, s.mesh, s.model_cfg)
        with RewardPool("strict", workers=1) as pool:
            _, m, texts = rl_step(s, state, 0, train_prompt_iterator(s), pool, jax.random.key(1), metrics.Timer())
        runs[engine] = m, texts
        if engine == "continuous":
            assert s.sampler.last_stats["steps"] > 0
    (ms, ts), (mc, tc) = runs["static"], runs["continuous"]
    assert ts and ts == tc
    for k in ms:
        if "time" not in k and not k.startswith("t_"):
            np.testing.assert_allclose(mc[k], ms[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_trainer_refuses_a_pool_its_tensor_axis_cannot_split():
    """tensor=8 over the tiny model's 2 KV heads would replicate the whole pool on every
    device (the paper configs' (1, 1, -1) on 16 chips: 16 > 8 heads); the trainer's setup
    refuses it before compiling and names a shape that splits it."""
    from oisd_jax.train_setup import build_setup
    from tiny_run import tiny_config
    kw = dict(train__sft_warmup_steps=0, sampler__engine="continuous", sampler__slots=4)
    with pytest.raises(ValueError, match=r"tensor axis \(8 devices\) does not divide the model's 2 KV heads.*"
                                         r"mesh\.sampler_shape=\(1, 4, 2\)"):
        build_setup(tiny_config(mesh__sampler_shape=(1, 1, 8), **kw))
    s = build_setup(tiny_config(mesh__sampler_shape=(1, 4, 2), **kw))  # the shape it names
    assert s.sampler.mesh.shape["tensor"] == 2 and s.sampler.engine == "continuous"
    static = build_setup(tiny_config(mesh__sampler_shape=(1, 1, 8), train__sft_warmup_steps=0))
    assert static.sampler.engine == "static"  # its cache is per call, not a standing pool


def test_config_validates_engine_fields():
    from oisd_jax.config import ConfigError, validate
    from tiny_run import tiny_config
    for field, bad in (("engine", "paged"), ("slots", 0), ("page_size", 0), ("pool_pages", 0),
                       ("paged_impl", "triton")):
        c = tiny_config()
        with c.unlocked():
            c.sampler[field] = bad
        with pytest.raises(ConfigError, match=f"sampler.{field}"):
            validate(c, num_devices=jax.device_count())
