"""Built-in rewards. Importing this package registers them."""

from . import stats  # noqa: F401
