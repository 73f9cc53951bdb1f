"""Hugging Face checkpoints <-> Params, streamed one tensor at a time.

Reading memory-maps each safetensors file (bf16 included, via ml_dtypes) and builds every
param with `jax.make_array_from_callback`, so each device pulls only the slices of its own
shard and the model never sits on the host twice. Writing fetches one tensor at a time
and streams it into the file behind a precomputed header.
"""
from __future__ import annotations

import json
import os
import struct as _struct
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from oisd_jax import parallel
from oisd_jax.model.config import ModelConfig
from oisd_jax.model.params import Params, ParamSpec, param_specs

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_IGNORED = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the tensor and the shapes."""


# ----------------------------------------------------------------------------- name map
def _leaf_table(cfg: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
    """Our leaf name -> (HF name pattern with {i}, hf->ours transform, ours->hf transform)."""
    D, H, KV, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    same = (lambda w: w, lambda w: w)
    proj = lambda n: (lambda w: w.T.reshape(D, n, Dh), lambda w: w.reshape(D, n * Dh).T)
    t = {
        "embed": ("model.embed_tokens.weight", *same),
        "final_norm": ("model.norm.weight", *same),
        "lm_head": ("lm_head.weight", lambda w: w.T, lambda w: w.T),
        "layers.attn_norm": ("model.layers.{i}.input_layernorm.weight", *same),
        "layers.mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", *same),
        "layers.wq": ("model.layers.{i}.self_attn.q_proj.weight", *proj(H)),
        "layers.wk": ("model.layers.{i}.self_attn.k_proj.weight", *proj(KV)),
        "layers.wv": ("model.layers.{i}.self_attn.v_proj.weight", *proj(KV)),
        "layers.wo": ("model.layers.{i}.self_attn.o_proj.weight",
                      lambda w: w.T.reshape(H, Dh, D), lambda w: w.reshape(H * Dh, D).T),
        "layers.w_gate": ("model.layers.{i}.mlp.gate_proj.weight", lambda w: w.T, lambda w: w.T),
        "layers.w_up": ("model.layers.{i}.mlp.up_proj.weight", lambda w: w.T, lambda w: w.T),
        "layers.w_down": ("model.layers.{i}.mlp.down_proj.weight", lambda w: w.T, lambda w: w.T),
    }
    if cfg.qk_norm:
        t["layers.q_norm"] = ("model.layers.{i}.self_attn.q_norm.weight", *same)
        t["layers.k_norm"] = ("model.layers.{i}.self_attn.k_norm.weight", *same)
    return t


def _named_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    flat = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))[0]
    return {".".join(k.name for k in path): spec for path, spec in flat}


def _hf_shape(spec: ParamSpec, to_hf: Callable) -> tuple[int, ...]:
    shape = spec.shape[1:] if spec.axes[0] == "layers" else spec.shape
    return to_hf(np.empty(shape, np.uint8)).shape


# ----------------------------------------------------------------------------- safetensors
class _SafetensorsFile:
    """Minimal memory-mapped reader (numpy cannot open bf16 through safe_open)."""

    def __init__(self, path: str):
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                n = _struct.unpack("<Q", f.read(8))[0]
                if not 0 < n <= size - 8:
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
            meta = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(v["data_offsets"][1]) for v in meta.values()), default=0)
        except (_struct.error, ValueError, KeyError, TypeError, AttributeError) as e:  # json errors are ValueErrors
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, its header needs {8 + n + end})")
        self.path = path
        self.meta = meta
        self._mm = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if self.meta else None

    def get(self, name: str) -> np.ndarray:
        info = self.meta[name]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        return self._mm[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def _open_checkpoint(path: str) -> dict[str, _SafetensorsFile]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {fn: _SafetensorsFile(os.path.join(path, fn)) for fn in sorted(set(weight_map.values()))}
        for name, fn in weight_map.items():
            if name not in files[fn].meta:
                raise CheckpointError(f"{index}: tensor {name} is listed in {fn} but not stored there")
        return {name: files[fn] for name, fn in weight_map.items()}
    names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    out = {}
    for fn in names:
        f = _SafetensorsFile(os.path.join(path, fn))
        out.update({name: f for name in f.meta})
    return out


# ----------------------------------------------------------------------------- load
def _finite(a: np.ndarray, name: str, path: str) -> np.ndarray:
    """`a`, or CheckpointError naming the tensor: NaN/inf weights make every update skip."""
    if np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16:
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a.astype(np.float32, copy=False))))
        if bad:
            raise CheckpointError(f"{path}: tensor {name} has {bad} non-finite value(s) (NaN or inf)")
    return a


def load_hf(path: str | os.PathLike, dtype=jnp.float32, mesh: Mesh | None = None, rules=parallel.RULES,
            **cfg_overrides) -> tuple[ModelConfig, Params]:
    """A Hugging Face folder (config.json + safetensors, single or sharded) -> (cfg, params).

    Each param is created directly in its target sharding (or on the first device) and
    dtype; every stored tensor is checked by name and shape before anything is read.
    """
    path = os.fspath(path)
    cfg = ModelConfig.from_hf(path, **cfg_overrides)
    tensors = _open_checkpoint(path)
    table, specs = _leaf_table(cfg), _named_specs(cfg)
    expected = {}
    for leaf, spec in specs.items():
        pattern, _, to_hf = table[leaf]
        names = [pattern.format(i=i) for i in range(cfg.num_layers)] if "{i}" in pattern else [pattern]
        for n in names:
            expected[n] = _hf_shape(spec, to_hf)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]} (expected shape {expected[missing[0]]})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    tied_extra = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = [n for n in tensors if n not in expected and n not in tied_extra and not n.endswith(_IGNORED)]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]} (shape "
                              f"{tuple(tensors[unexpected[0]].meta[unexpected[0]]['shape'])}) for a "
                              f"{cfg.family} model" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    for n, shape in expected.items():
        got = tuple(tensors[n].meta[n]["shape"])
        if got != tuple(shape):
            raise CheckpointError(f"{path}: tensor {n} has shape {got}, expected {tuple(shape)}")

    np_dtype = np.dtype(jnp.dtype(dtype))

    def build(leaf: str, spec: ParamSpec) -> jax.Array:
        pattern, to_ours, _ = table[leaf]
        read = lambda name: to_ours(_finite(tensors[name].get(name), name, path)).astype(np_dtype)
        if spec.axes[0] == "layers":
            def cb(idx):
                layers = range(cfg.num_layers)[idx[0]]
                return np.stack([read(pattern.format(i=i))[idx[1:]] for i in layers])
        else:
            cb = lambda idx: read(pattern)[idx]
        sharding = (parallel.sharding_for(spec.axes, mesh, spec.shape, rules) if mesh is not None
                    else SingleDeviceSharding(jax.devices()[0]))
        return jax.make_array_from_callback(spec.shape, sharding, cb)

    flat = {leaf: build(leaf, spec) for leaf, spec in specs.items()}
    treedef_specs = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))
    leaves = [flat[".".join(k.name for k in p)] for p, _ in treedef_specs[0]]
    return cfg, jax.tree.unflatten(treedef_specs[1], leaves)


# ----------------------------------------------------------------------------- save
def _fetch(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_hf(cfg: ModelConfig, params: Params, out_dir: str | os.PathLike, dtype="float32",
            max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json + safetensors (sharded with an index past `max_shard_bytes`)
    that `transformers.AutoModelForCausalLM.from_pretrained` loads. Process 0 writes."""
    out_dir = os.fspath(out_dir)
    np_dtype = np.dtype(jnp.dtype(dtype))
    table, specs = _leaf_table(cfg), _named_specs(cfg)
    leaves = {".".join(k.name for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    # (HF name, shape, getter) in HF order; each getter fetches one tensor from the devices.
    items = []
    for leaf, spec in specs.items():
        pattern, _, to_hf = table[leaf]
        shape = _hf_shape(spec, to_hf)
        if "{i}" in pattern:
            for i in range(cfg.num_layers):
                items.append((pattern.format(i=i), shape, lambda leaf=leaf, i=i, f=to_hf: f(_fetch(leaves[leaf][i]))))
        else:
            items.append((pattern, shape, lambda leaf=leaf, f=to_hf: f(_fetch(leaves[leaf]))))
    items.sort(key=lambda it: it[0])
    nbytes = lambda shape: int(np.prod(shape)) * np_dtype.itemsize
    shards, cur, size = [], [], 0
    for it in items:
        if cur and size + nbytes(it[1]) > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += nbytes(it[1])
    shards.append(cur)
    if jax.process_index() != 0:
        for shard in shards:  # every process takes part in the gathers
            for _, _, get in shard:
                get()
        return
    os.makedirs(out_dir, exist_ok=True)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map = {}
    for fn, shard in zip(names, shards):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _ in shard:
            header[name] = {"dtype": _ST_NAMES[np_dtype], "shape": list(shape), "data_offsets": [off, off + nbytes(shape)]}
            off += nbytes(shape)
            weight_map[name] = fn
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        tmp = os.path.join(out_dir, fn + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_struct.pack("<Q", len(blob)) + blob)
            for name, shape, get in shard:
                arr = np.ascontiguousarray(get().astype(np_dtype))
                assert arr.shape == tuple(shape), (name, arr.shape, shape)
                f.write(arr.tobytes())
        os.replace(tmp, os.path.join(out_dir, fn))  # a reader never sees half a file
    if len(shards) > 1:
        total = sum(nbytes(s) for _, s, _ in items)
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf(torch_dtype=str(np_dtype) if np_dtype != ml_dtypes.bfloat16 else "bfloat16"), f, indent=2)
