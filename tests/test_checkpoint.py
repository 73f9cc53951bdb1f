"""Checkpointer: round trip into given shardings, keep-N, resume, atomic tmp dirs, fallback."""
import glob
import os
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from oisd_jax.checkpoint import Checkpointer


class AdamLike(NamedTuple):  # optax states are NamedTuples of pytrees
    count: jax.Array
    mu: dict


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))


def make_state(mesh, seed=0):
    r = np.random.default_rng(seed)
    w = r.standard_normal((8, 16)).astype(np.float32)
    return {
        "params": {"w": jax.device_put(w, NamedSharding(mesh, P("fsdp", "data"))),
                   "b": jnp.asarray(r.standard_normal(16), jnp.bfloat16)},
        "opt": AdamLike(count=jnp.asarray(seed, jnp.int32),
                        mu={"w": jax.device_put(w * 0.5, NamedSharding(mesh, P(None, "fsdp")))}),
        "step": np.int32(seed),  # numpy leaves too (int64 would be int32 without x64)
    }


def abstract_of(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_roundtrip_into_new_shardings(tmp_path, mesh):
    state = make_state(mesh, seed=3)
    config = ml_collections.ConfigDict({"rl": {"tap_layer": 6, "algorithm": "oisd"},
                                        "mesh": {"shape": (1, -1, 1)}})
    data_state = {"epoch": 2, "index": 17, "blob": b"\x00\xffgrain"}
    rng = jax.random.key(42)
    with Checkpointer(tmp_path / "ckpt", async_save=True) as ck:
        assert ck.save(5, state, data_state=data_state, rng=rng, config=config)
        ck.wait_until_finished()
        assert ck.latest_step() == 5
        # restore into a layout that differs from the saved one: read shard-wise in place
        repl = NamedSharding(mesh, P())
        shardings = {"params": {"w": NamedSharding(mesh, P("data", "fsdp")), "b": repl},
                     "opt": AdamLike(count=repl, mu={"w": NamedSharding(mesh, P("fsdp", None))}),
                     "step": repl}
        out = ck.restore(abstract_state=abstract_of(state, shardings))
    assert out.step == 5
    assert_tree_equal(out.state, state)
    assert isinstance(out.state["opt"], AdamLike)
    got = jax.tree.map(lambda x: x.sharding, out.state)
    assert jax.tree.all(jax.tree.map(lambda g, s: g.is_equivalent_to(s, 2), got, shardings))
    assert out.data_state == data_state
    assert jax.dtypes.issubdtype(out.rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(out.rng), jax.random.key_data(rng))
    np.testing.assert_array_equal(jax.random.uniform(out.rng, (4,)), jax.random.uniform(rng, (4,)))
    assert out.config == {"rl": {"tap_layer": 6, "algorithm": "oisd"}, "mesh": {"shape": [1, -1, 1]}}
    assert ml_collections.ConfigDict(out.config).rl.tap_layer == 6


def test_raw_key_and_sync_save(tmp_path, mesh):
    raw = jax.random.PRNGKey(7)  # legacy uint32[2] key
    state = {"x": jnp.arange(6.0)}
    with Checkpointer(tmp_path, async_save=False) as ck:
        ck.save(1, state, rng=raw, data_state=None, config=None)
        out = ck.restore()  # no abstract state: as saved
    assert out.rng.dtype == jnp.uint32
    np.testing.assert_array_equal(out.rng, raw)
    assert out.data_state is None and out.config is None
    np.testing.assert_array_equal(out.state["x"], np.arange(6.0))


def test_keep_n_and_resume_latest(tmp_path, mesh):
    ckdir = tmp_path / "run"
    with Checkpointer(ckdir, max_to_keep=2) as ck:
        for step in (10, 20, 30, 40):
            ck.save(step, make_state(mesh, seed=step), data_state={"step": step})
        ck.wait_until_finished()
        assert ck.all_steps() == [30, 40]
        with pytest.warns(RuntimeWarning, match="step 40 already exists"):
            assert not ck.save(40, make_state(mesh, 0))
    assert sorted(os.listdir(ckdir)) == ["30", "40"]  # older steps deleted on disk
    # a new process resumes from the newest step
    state = make_state(mesh, seed=0)
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", NamedSharding(mesh, P())), state)
    with Checkpointer(ckdir, max_to_keep=2) as ck:
        assert ck.latest_step() == 40
        out = ck.restore(abstract_state=abstract_of(state, shardings))
        assert out.step == 40 and out.data_state == {"step": 40}
        assert_tree_equal(out.state, make_state(mesh, seed=40))
        assert ck.restore(step=30, abstract_state=abstract_of(state, shardings)).data_state == \
            {"step": 30}


def test_async_save_is_atomic(tmp_path):
    """Orbax writes `<step>.orbax-checkpoint-tmp` and renames it when complete."""
    ckdir = tmp_path / "run"
    with Checkpointer(ckdir) as ck:
        ck.save(1, {"x": jnp.ones((512, 512))})
        names = os.listdir(ckdir)  # mid-save: only the tmp name, or already renamed
        assert names in (["1.orbax-checkpoint-tmp"], ["1"]), names
        ck.wait_until_finished()
        assert os.listdir(ckdir) == ["1"]
    # a crash mid-save leaves a tmp folder: never a step, and removed on the next start
    crashed = ckdir / "2.orbax-checkpoint-tmp"
    (crashed / "state").mkdir(parents=True)
    (crashed / "state" / "junk").write_bytes(b"partial")
    with Checkpointer(ckdir) as ck:
        assert ck.all_steps() == [1] and ck.latest_step() == 1
        assert ck.restore().step == 1
    assert not crashed.exists()


@pytest.mark.parametrize("damage", ["array_files", "json_item", "missing_item"])
def test_corrupt_latest_falls_back_with_warning(tmp_path, mesh, damage):
    ckdir = tmp_path / "run"
    with Checkpointer(ckdir, max_to_keep=3) as ck:
        for step in (1, 2):
            ck.save(step, make_state(mesh, seed=step), data_state={"step": step})
    latest = ckdir / "2"
    if damage == "array_files":  # every file of the state item overwritten with garbage
        files = [f for f in glob.glob(f"{latest}/state/**", recursive=True) if os.path.isfile(f)]
        assert files
        for f in files:
            with open(f, "wb") as fh:
                fh.write(b"\x00garbage")
    elif damage == "json_item":
        (latest / "data" / "metadata").write_text("{truncated")
    else:
        import shutil
        shutil.rmtree(latest / "state")
    state = make_state(mesh, seed=0)
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", NamedSharding(mesh, P())), state)
    with Checkpointer(ckdir, max_to_keep=3) as ck:
        assert ck.latest_step() == 2
        with pytest.warns(RuntimeWarning, match="checkpoint step 2 .* is unreadable"):
            out = ck.restore(abstract_state=abstract_of(state, shardings))
        assert out.step == 1 and out.data_state == {"step": 1}
        assert_tree_equal(out.state, make_state(mesh, seed=1))
        # an explicitly requested step is not silently replaced
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(Exception):
                ck.restore(step=2, abstract_state=abstract_of(state, shardings))


def test_no_checkpoint(tmp_path):
    with Checkpointer(tmp_path / "empty") as ck:
        assert ck.latest_step() is None
        with pytest.raises(FileNotFoundError):
            ck.restore()
