"""Paths given by users: ``~`` expansion that cannot crash, and output folders checked before a run.

A user's string may be a path, a hub id, a prompt set name or a prompt; asking the file system
about it must not raise (``Path("~nobody").expanduser()`` raises RuntimeError, a 300-character
string raises "File name too long").  Output folders are checked when a configuration is built, so
``output_dir=<an existing file>`` is a one-line error before any model loads, not a traceback at
the first write.
"""

from __future__ import annotations

from pathlib import Path

from align.core.errors import ConfigError


def user_path(text: str | Path) -> Path:
    """``text`` as a Path with ``~`` / ``~user`` expanded; unchanged when that user does not exist."""
    path = Path(text)
    try:
        return path.expanduser()
    except RuntimeError:  # "Could not determine home directory" for an unknown ~user
        return path


def is_file(path: str | Path) -> bool:
    """Whether ``path`` is an existing file; False for strings the file system cannot even look up."""
    try:
        return user_path(path).is_file()
    except (OSError, ValueError):  # name too long, embedded NUL byte
        return False


def is_dir(path: str | Path) -> bool:
    """Whether ``path`` is an existing folder; False for strings the file system cannot look up."""
    try:
        return user_path(path).is_dir()
    except (OSError, ValueError):
        return False


def check_output_dir(field: str, value: str | Path) -> None:
    """Raise ConfigError unless ``value`` can be (or already is) a folder we write into.

    Refused: an empty name, an existing file, a path under an existing file.  Whether the folder
    may already hold outputs is each command's own rule (resume, replace or refuse).
    """
    if not str(value).strip():
        raise ConfigError(f"{field}={str(value)!r} is empty; give a folder to write into")
    path = user_path(value)
    try:
        blocking = next((p for p in (path, *path.parents) if p.exists()), None)
    except (OSError, ValueError) as exc:  # name too long, embedded NUL byte
        raise ConfigError(f"{field}={str(value)!r} is not a usable folder path ({exc}); give another folder") from None
    if blocking is None or blocking.is_dir():
        return
    if blocking == path:
        raise ConfigError(f"{field}={str(value)!r} is an existing file; accepted: a folder (existing or new)")
    raise ConfigError(f"{field}={str(value)!r} lies under {str(blocking)!r}, which is a file; accepted: a folder path")
