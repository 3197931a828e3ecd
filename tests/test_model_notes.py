"""A model's own notes (diffusion_align.json): recommended settings where the user set nothing, its vocabulary."""

import json

import pytest

from align.core.config import explicit_fields, is_explicit, load_config, replace_config
from align.core.errors import AlignError
from align.core.model_notes import ModelNotes, apply_recommended
from align.core.models import builtin_model_path
from align.train.trainer import TrainConfig


@pytest.fixture(scope="module")
def builtin_notes():
    notes = ModelNotes.read(builtin_model_path())
    assert notes is not None
    return notes


def test_builtin_notes_match_its_world(builtin_notes):
    from align.builtin import shapes_world as shapes

    assert builtin_notes.vocabulary == frozenset(shapes.VOCABULARY)
    assert builtin_notes.recommended["train"]["method.learning_rate"] == 3e-3


def test_recommended_settings_fill_only_what_the_user_left_unset(builtin_notes):
    config = load_config(TrainConfig, None, ["method=alignprop", "alignprop.learning_rate=1e-4", "lora.rank=16"])
    new, applied = apply_recommended(config, builtin_notes, "train")
    assert new.alignprop.learning_rate == 1e-4 and new.lora.rank == 16  # the user's choices stand
    assert new.alignprop.num_steps == 20 and new.alignprop.guidance_scale == 4.0 and new.alignprop.weight_decay == 0.0
    assert new.draft.learning_rate == 2e-4  # other methods' sections are untouched
    assert applied == ["alignprop.weight_decay=0.0", "alignprop.num_steps=20", "alignprop.guidance_scale=4.0"]
    assert explicit_fields(new) == explicit_fields(config)


def test_a_value_equal_to_the_default_set_explicitly_is_kept(builtin_notes):
    config = load_config(TrainConfig, None, ["draft.learning_rate=0.0002"])  # the paper default, on purpose
    new, applied = apply_recommended(config, builtin_notes, "train")
    assert new.draft.learning_rate == 2e-4
    assert not any(a.startswith("draft.learning_rate") for a in applied)


def test_python_built_configs_count_non_default_fields_as_set(builtin_notes):
    config = TrainConfig()
    config.draft.learning_rate = 5e-4
    assert is_explicit(config, "draft.learning_rate") and not is_explicit(config, "draft.num_steps")
    new, applied = apply_recommended(config, builtin_notes, "train")
    assert new.draft.learning_rate == 5e-4 and new.draft.num_steps == 20


def test_replace_config_keeps_the_explicit_record():
    config = load_config(TrainConfig, None, ["seed=3"])
    new = replace_config(config, max_steps=7)
    assert explicit_fields(new) == {"seed", "max_steps"}


def test_recommendations_can_be_refused_and_bad_ones_are_named(builtin_notes, tmp_path):
    class Off:
        model_recommendations = False

    off = Off()
    assert apply_recommended(off, builtin_notes, "train") == (off, [])
    (tmp_path / "diffusion_align.json").write_text(json.dumps({"name": "m", "recommended": {"train": {"nope": 1}}}))
    with pytest.raises(AlignError, match="m recommends nope=1 for `train`, which has no such field"):
        apply_recommended(TrainConfig(), ModelNotes.read(tmp_path), "train")
    (tmp_path / "diffusion_align.json").write_text("{not json")
    with pytest.raises(AlignError, match="is not a readable JSON file"):
        ModelNotes.read(tmp_path)
    assert ModelNotes.read(tmp_path / "missing") is None


def test_vocabulary_warning_names_unknown_and_known_words(builtin_notes):
    assert builtin_notes.vocabulary_warning(["a red circle on a blue background"]) is None
    text = builtin_notes.vocabulary_warning(["a cat", "A dog on a red background"])
    assert "does not know the word(s) 'cat', 'dog'" in text
    assert "the words it knows: a, background, black, blue, circle" in text


def test_the_builtin_model_warns_once_about_words_it_does_not_know(caplog):
    from align.core.models import load_model

    model = load_model("builtin", device="cpu")
    with caplog.at_level("WARNING"):
        model.encode_prompts(["a red circle on a blue background"], guidance=False)
        assert not caplog.records
        model.encode_prompts(["a cat", "a dog"], guidance=False)
        model.encode_prompts(["a horse"], guidance=False)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "does not know the word(s) 'cat', 'dog'" in warnings[0]


def test_recommendations_per_method(builtin_notes):
    """The built-in model's policy-gradient settings apply to ddpo / grpo only (top-level fields included), over the
    generic block; generic method keys a method lacks are skipped, and draft keeps its own recommendations."""
    grpo, applied = apply_recommended(load_config(TrainConfig, None, ["method=grpo", "grpo.group_size=4"]), builtin_notes,
                                      "train")
    assert grpo.grpo.learning_rate == 0.01 and grpo.grpo.num_steps == 8 and grpo.grpo.rollout_prompts == 2
    assert grpo.batch_size == 8 and grpo.gradient_accumulation_steps == 2 and grpo.lora.rank == 4
    assert grpo.grpo.group_size == 4  # the user's
    assert "grpo.learning_rate=0.01" in applied and "batch_size=8" in applied
    assert not any(a.startswith(("grpo.tracker", "grpo.rollout_samples", "ddpo.")) for a in applied)
    ddpo, _ = apply_recommended(load_config(TrainConfig, None, ["method=ddpo"]), builtin_notes, "train")
    assert ddpo.ddpo.rollout_samples == 16 and ddpo.ddpo.tracker_min_count == 8 and ddpo.grpo.learning_rate == 3e-4
    draft, applied = apply_recommended(load_config(TrainConfig, None, []), builtin_notes, "train")
    assert draft.draft.learning_rate == 3e-3 and draft.batch_size == 2 and draft.grpo.num_steps == 10
    assert not any(a.startswith(("grpo.", "ddpo.", "batch_size")) for a in applied)
