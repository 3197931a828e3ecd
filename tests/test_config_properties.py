"""Property-based tests: arbitrary configs, overrides and prompts give a result or the toolkit's own clear error."""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from align.builtin.testing import tiny_pipeline
from align.core.config import field_types, from_dict, load_config
from align.core.errors import AlignError
from align.core.models import DiffusionModel
from align.core.prompts import load_prompts
from align.train.trainer import TrainConfig
from align.train.truncation import LastK, RandomCutoff, RandomLateStep

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _keys(cls, prefix=""):
    out = []
    for name, tp in field_types(cls).items():
        out.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            out += _keys(tp, prefix + name + ".")
    return out


KEYS = _keys(TrainConfig) + ["unknown_key", "draft.nope", "lora.rnak"]


def _nest(flat):
    data = {}
    for key, value in flat.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return data


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
def test_any_config_mapping_builds_or_raises_a_clear_error(flat):
    try:
        config = from_dict(TrainConfig, _nest(flat))
    except AlignError as exc:
        assert str(exc)  # a message, naming what was wrong
    else:
        assert isinstance(config, TrainConfig)
        assert config.method_config.num_steps >= 1


@FAST
@given(st.lists(st.text(max_size=30), max_size=4))
def test_any_override_strings_load_or_raise_a_clear_error(overrides):
    try:
        load_config(TrainConfig, None, overrides)
    except AlignError as exc:
        assert str(exc)


@FAST
@given(st.sampled_from(KEYS), st.text(max_size=20))
def test_any_single_override_value(key, raw):
    try:
        load_config(TrainConfig, None, [f"{key}={raw}"])
    except AlignError as exc:
        assert str(exc)


@FAST
@given(st.one_of(st.text(max_size=40), st.lists(st.text(max_size=20), max_size=4)))
@example("~0")  # a ~user path whose user does not exist (pathlib raised RuntimeError)
@example("x" * 400)  # longer than a file name may be (the file system raised OSError)
@example("a\x00b")  # an embedded NUL byte
def test_any_prompt_spec_loads_or_raises(spec):
    try:
        prompts = load_prompts(spec)
    except AlignError:
        return
    assert prompts and all(isinstance(p, str) for p in prompts)


@pytest.fixture(scope="module")
def tiny_model():
    return DiffusionModel(tiny_pipeline("sd"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.text(max_size=200), min_size=0, max_size=3))
def test_any_prompts_encode_or_raise(tiny_model, prompts):
    try:
        pc = tiny_model.encode_prompts(prompts, guidance=True)
    except AlignError:
        assert not prompts
        return
    assert pc.cond["encoder_hidden_states"].shape[0] == len(prompts)
    assert torch.isfinite(pc.cond["encoder_hidden_states"]).all()


@FAST
@given(
    st.integers(min_value=-5, max_value=200),
    st.integers(min_value=-5, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=0, max_value=2**32 - 1),
)
def test_truncation_policies_give_valid_plans_or_clear_errors(k, steps, a, b, seed):
    gen = torch.Generator().manual_seed(seed)
    for make in (lambda: LastK(k), lambda: RandomCutoff("gaussian", a, abs(b) if b == b else b), lambda: RandomLateStep(a, b)):
        try:
            plan = make().plan(steps, gen)
        except AlignError:
            continue
        assert 0 <= plan.first_grad_step < steps
        assert 1 <= plan.grad_steps <= steps
