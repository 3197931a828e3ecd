"""What a model folder tells this toolkit about itself: ``diffusion_align.json`` beside ``model_index.json``.

A model may ship recommended settings per command (the built-in model learns at lr 3e-3 where the
papers' 2e-4 for real models barely moves it in 40 steps) and the words its text encoder knows (the
built-in model's word-level tokenizer drops every other word, so "a cat" draws an arbitrary shape).
Recommended settings are applied only to fields the user has not set, and each application is
reported; ``model_recommendations=false`` turns them off.  The file::

    {"name": "the built-in model",
     "vocabulary": ["a", "on", "background", "circle", ...],
     "recommended": {"train": {"method.learning_rate": 0.003, "lora.rank": 4}}}

``method.`` stands for the section of the method a training config selects (``draft.``, ...); a
``method.`` key that the selected method has no field for (``method.group_size`` for draft) is
skipped.  Recommendations per method: a block ``"train.grpo": {...}`` applies only when that method
is selected, over the ``"train"`` block (it may set any field: ``"batch_size": 8``); a key naming a
method's own section (``grpo.learning_rate``) applies only when that method is selected too.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.core.errors import AlignError

NOTES_FILE = "diffusion_align.json"
logger = logging.getLogger("align")


@dataclass(frozen=True)
class ModelNotes:
    """The content of a model folder's ``diffusion_align.json``.

    Attributes:
        name: how messages call the model ("the built-in model").
        vocabulary: the words its text encoder knows (None: any text).
        recommended: command -> {dotted config field: value} applied where the user set nothing.
    """

    name: str
    vocabulary: frozenset[str] | None = None
    recommended: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: str | Path | None) -> ModelNotes | None:
        """The notes of a local model folder, or None when it has none (or is not a local folder)."""
        if folder is None:
            return None
        path = Path(folder) / NOTES_FILE
        try:
            if not path.is_file():
                return None
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AlignError(f"{str(path)!r} is not a readable JSON file: {exc}") from None
        vocabulary = data.get("vocabulary")
        return cls(
            name=str(data.get("name", Path(folder).name)),
            vocabulary=None if vocabulary is None else frozenset(str(w).lower() for w in vocabulary),
            recommended={str(k): dict(v) for k, v in data.get("recommended", {}).items()},
        )

    def unknown_words(self, prompts: Iterable[str]) -> list[str]:
        """Words of ``prompts`` outside the vocabulary, in first-seen order (none without a vocabulary)."""
        if self.vocabulary is None:
            return []
        seen: dict[str, None] = {}
        for prompt in prompts:
            for word in re.findall(r"[\w'-]+", prompt.lower()):
                if word not in self.vocabulary:
                    seen.setdefault(word, None)
        return list(seen)

    def vocabulary_warning(self, prompts: Sequence[str]) -> str | None:
        """A message naming the unknown words and the known ones, or None when every word is known."""
        unknown = self.unknown_words(prompts)
        if not unknown:
            return None
        return (
            f"{self.name} does not know the word(s) {', '.join(map(repr, unknown[:8]))}"
            f"{' ...' if len(unknown) > 8 else ''} and ignores them, so such prompts draw arbitrary images; "
            f"the words it knows: {', '.join(sorted(self.vocabulary))}"
        )


def apply_recommended(config: Any, notes: ModelNotes | None, command: str) -> tuple[Any, list[str]]:
    """``config`` with the model's recommended settings for ``command`` where the user set nothing.

    Returns the (re-validated) config and the applied settings as ``"field=value"`` strings.  A
    config field ``model_recommendations`` set to False disables this.
    """
    from align.core.config import _mark_explicit, explicit_fields, from_dict, is_explicit, to_dict

    if notes is None or not getattr(config, "model_recommendations", True):
        return config, []
    data = to_dict(config)
    applied = []
    wanted = dict(notes.recommended.get(command, {}))
    method = getattr(config, "method", None)
    if method is not None:
        wanted.update(notes.recommended.get(f"{command}.{method}", {}))
    for key, (dotted, value) in _resolve_method_keys(config, wanted).items():
        try:
            explicit = is_explicit(config, dotted)
        except (AttributeError, StopIteration):
            raise AlignError(f"{notes.name} recommends {key}={value!r} for `{command}`, which has no such field") from None
        if explicit:
            continue
        node = data
        *path, name = dotted.split(".")
        for part in path:
            node = node[part]
        if node[name] == value:
            continue
        node[name] = value
        applied.append(f"{dotted}={value!r}")
    if not applied:
        return config, []
    new = from_dict(type(config), data)
    _mark_explicit(new, explicit_fields(config))  # what the user set, not what was recommended
    return new, applied


def _resolve_method_keys(config: Any, wanted: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """{key: (dotted field, value)} of the recommendations that apply to ``config``'s method.

    ``method.X`` becomes ``<method>.X`` when the selected method has a field X (skipped when only other methods
    have it); ``<other method>.X`` is skipped; ``<method>.X`` replaces ``method.X``.  A ``method.X`` that no method
    has stays, to be reported as unknown.
    """
    import dataclasses

    sections = tuple(getattr(config, "method_sections", ()))
    selected = getattr(config, "method", None)
    resolved: dict[str, tuple[str, Any]] = {}
    specific: dict[str, tuple[str, Any]] = {}
    for key, value in wanted.items():
        head, _, rest = key.partition(".")
        if head == "method" and selected is not None:
            section = getattr(config, selected)
            names = {f.name for f in dataclasses.fields(section)}
            elsewhere = any(rest in {f.name for f in dataclasses.fields(getattr(config, s))} for s in sections)
            if rest.split(".")[0] not in names and elsewhere:
                continue  # a field of other methods only
            resolved[key] = (f"{selected}.{rest}", value)
        elif head in sections and head != selected:
            continue
        elif head in sections:
            specific[key] = (key, value)
        else:
            resolved[key] = (key, value)
    overridden = {dotted for dotted, _ in specific.values()}
    out = {k: v for k, v in resolved.items() if v[0] not in overridden}
    out.update(specific)
    return out
