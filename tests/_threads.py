"""A module-scoped fixture running a test module's tiny models on one thread.

Tiny models and the analytic toy have tensors far too small for intra-op parallelism: extra threads
only add synchronisation, which on shared, oversubscribed cores slows them down several-fold.
Import it into a test module (``from _threads import one_thread  # noqa: F401``) to apply it there.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
