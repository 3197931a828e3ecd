"""Prompt sets: named sets shipped with the package, plain text files, or inline lists.

``load_prompts("simple_animals")`` gives the 45 animal names used by DDPO and AlignProp;
``load_prompts("shapes")`` the built-in model's prompts; ``load_prompts("my_prompts.txt")`` one
prompt per non-empty line (``#`` starts a comment); a list is returned as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from align.core.errors import AlignError
from align.core.paths import is_file, user_path

_HERE = Path(__file__).resolve().parent


def named_prompt_sets() -> list[str]:
    """Names accepted by :func:`load_prompts` besides file paths."""
    return sorted([p.stem for p in _HERE.glob("*.txt")] + ["shapes", "shapes_heldout"])


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a text file: one per non-empty line, ``#`` comments ignored."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AlignError(f"prompt file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    prompts = [line.split("#", 1)[0].strip() for line in lines]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise AlignError(f"prompt file {str(path)!r} holds no prompts (one per line expected)")
    return prompts


def load_prompts(spec: str | Sequence[str]) -> list[str]:
    """Resolve a prompt set: a named set, a text file path, or a list of prompts."""
    if isinstance(spec, (list, tuple)):
        prompts = [str(p) for p in spec]
        if not prompts or not all(p.strip() for p in prompts):
            raise AlignError(f"prompts={list(spec)!r} must be a non-empty list of non-empty strings")
        return prompts
    if not isinstance(spec, str) or not spec.strip():
        raise AlignError(f"prompts={spec!r} must be a prompt-set name, a text file, or a list of prompts")
    if spec in ("shapes", "shapes_heldout"):
        from align.builtin import shapes_world as shapes

        return list(shapes.TRAIN_PROMPTS if spec == "shapes" else shapes.HELDOUT_PROMPTS)
    shipped = _HERE / f"{spec}.txt"
    if "/" not in spec and is_file(shipped):
        return read_prompt_file(shipped)
    if is_file(spec):
        return read_prompt_file(user_path(spec))
    raise AlignError(
        f"prompts={spec!r} is neither a named prompt set nor an existing file; named sets: "
        f"{', '.join(named_prompt_sets())}; or give a path to a text file with one prompt per line"
    )
