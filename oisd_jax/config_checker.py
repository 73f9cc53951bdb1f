"""Checker: the field checks `oisd_jax.config.validate` is built from.

Each check reads a dotted field path, records one message per bad field (so validation
reports every problem at once) and remembers the values that passed in `valid`, which
checks across sections read instead of checking a field twice.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterable

import ml_collections

from oisd_jax.choices import MESH_AXES

MISSING = object()  # a path the config does not have (reported once)


class Checker:
    """Collects problems; each check reads a dotted field path from the config."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.problems: list[str] = []
        self.valid: dict[str, Any] = {}  # path -> value, for fields that passed choice/number

    def get(self, path: str) -> Any:
        """The field's value, or MISSING (reported once) when the path does not exist."""
        node = self.config
        for part in path.split("."):
            try:
                node = node[part]
            except (KeyError, TypeError, AttributeError):
                msg = f"{path} is missing"
                if msg not in self.problems:
                    self.bad(msg)
                return MISSING
        return node

    def bad(self, msg: str) -> None:
        self.problems.append(msg)

    def choice(self, path: str, choices: Iterable[str]) -> Any:
        v = self.get(path)
        if v is MISSING:
            return None
        if v not in tuple(choices):
            self.bad(f"{path}={v!r} is not one of {tuple(choices)}")
            return None
        self.valid[path] = v
        return v

    def number(self, path: str, *, gt: float | None = None, ge: float | None = None,
               lt: float | None = None, le: float | None = None, integer: bool = False,
               optional: bool = False) -> Any:
        v = self.get(path)
        if v is MISSING or (v is None and optional):
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            self.bad(f"{path}={v!r} must be {'an integer' if integer else 'a number'}")
            return None
        if not math.isfinite(v):
            self.bad(f"{path}={v!r} must be finite")
            return None
        bounds = [(gt, lambda a, b: a > b, ">"), (ge, lambda a, b: a >= b, ">="),
                  (lt, lambda a, b: a < b, "<"), (le, lambda a, b: a <= b, "<=")]
        for bound, ok, sym in bounds:
            if bound is not None and not ok(v, bound):
                self.bad(f"{path}={v!r} must be {sym} {bound}")
                return None
        self.valid[path] = v
        return v

    def boolean(self, path: str) -> Any:
        v = self.get(path)
        if v is not MISSING and not isinstance(v, bool):
            self.bad(f"{path}={v!r} must be True or False")
        return v

    def mesh_shape(self, path: str, num_devices: int | None) -> tuple[int, ...] | None:
        shape = self.get(path)
        if shape is None or shape is MISSING:
            return None
        if (not isinstance(shape, (tuple, list)) or len(shape) != len(MESH_AXES)
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
            self.bad(f"{path}={shape!r} must be {len(MESH_AXES)} integers {MESH_AXES}")
            return None
        if any(s == 0 or s < -1 for s in shape) or list(shape).count(-1) > 1:
            self.bad(f"{path}={tuple(shape)}: axes must be >= 1, with at most one -1 (= the rest)")
            return None
        known = math.prod(s for s in shape if s != -1)
        if num_devices is None:
            return None
        if -1 in shape:
            if num_devices % known:
                self.bad(f"{path}={tuple(shape)}: {num_devices} devices are not divisible by "
                         f"the fixed axes' product {known}")
                return None
            return tuple(num_devices // known if s == -1 else s for s in shape)
        if known != num_devices:
            self.bad(f"{path}={tuple(shape)} needs {known} devices, but {num_devices} are available")
            return None
        return tuple(shape)

    def path_exists(self, path: str, *, directory: bool, must_contain: str | None = None) -> None:
        v = self.get(path)
        if v is None or v is MISSING:
            return
        p = os.path.expanduser(str(v))
        if not os.path.exists(p):
            self.bad(f"{path}={v!r} does not exist")
        elif directory and not os.path.isdir(p):
            self.bad(f"{path}={v!r} is not a folder")
        elif not directory and os.path.isdir(p):
            self.bad(f"{path}={v!r} is a folder, expected a file")
        elif must_contain and not os.path.exists(os.path.join(p, must_contain)):
            self.bad(f"{path}={v!r} has no {must_contain}")
