"""Config fuzzing with hypothesis (issue 16): any value in any field of configs/tiny.py, set
the way a user sets it (a ':arg' literal, or a NaN/inf float as `--config.x=nan` gives),
is accepted or refused by validation with ONE line that names a dotted field; never
another exception (a traceback at the CLI). Bounded: derandomized, a fixed number of
examples, no deadline (validation reads the preset model once per example).
"""
import math
import re

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from oisd_jax import cli  # noqa: E402
from oisd_jax.config import ConfigError, validate  # noqa: E402
from oisd_jax.config_files import load_config_file  # noqa: E402
from tiny_run import config_leaf_fields  # noqa: E402

TINY = "configs/tiny.py"
SECTIONS = ("model", "data", "sampler", "rl", "optim", "train", "mesh", "eval")
_FIELD = re.compile(r"\b(?:%s)\.\w+" % "|".join(SECTIONS))


FIELDS = sorted(config_leaf_fields(load_config_file(TINY)))
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**40, 2**40), st.sampled_from([0, 1, -1, 2, 3, 7, 64, 10**6]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -0.5, 1e-9, 0.5, 2.0]),
    st.text(st.sampled_from("abxyz019-_./ "), max_size=6),
    st.tuples(st.integers(-2, 9)), st.tuples(st.integers(-2, 9), st.integers(-2, 9), st.integers(-2, 9)),
)


def _configure(assignments):
    """The config with `assignments` applied as a user would; a ConfigError if refused there."""
    literal = [(f, v) for f, v in assignments if not (isinstance(v, float) and not math.isfinite(v))]
    arg = ",".join(f"{f}={v!r}" for f, v in literal)
    c = load_config_file(f"{TINY}:{arg}" if arg else TINY)
    for f, v in assignments:
        if (f, v) in literal:
            continue
        *parents, leaf = f.split(".")
        node = c
        for p in parents:
            node = node[p]
        try:
            with c.unlocked():
                node[leaf] = v  # what `--config.<f>=nan` does to a float field
        except TypeError:
            return None  # ml_collections refuses the flag for a non-float field (its own one line)
    return c


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1, max_size=2, unique_by=lambda fv: fv[0]))
def test_any_value_in_any_field_is_accepted_or_one_line_naming_a_field(assignments):
    try:
        c = _configure(assignments)
        if c is None:
            return
        validate(c, num_devices=8)
    except ConfigError as e:
        line = cli.one_line(e)
        assert "\n" not in line and "Traceback" not in line, line
        assert _FIELD.search(line) or "config argument" in line, line
