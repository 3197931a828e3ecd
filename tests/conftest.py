"""Test-suite settings.

One CPU thread per test process (and for the worker processes tests start, through the
environment): the models here are tiny, so a second thread buys nothing, and where tests run
several processes at once (torchrun ranks, benchmark workers) or the machine is shared, spinning
OpenMP threads on oversubscribed cores made a 16-channel convolution 250 times slower (25 ms
instead of 0.1 ms, measured).

Property tests (hypothesis) are derandomized by default: every run draws the same examples (seeded
from each test's name), so CI cannot fail on one draw and pass on the next.  Their reach is kept
(the same number of examples, the same strategies), and cases found once are pinned with
``@example``.  ``HYPOTHESIS_PROFILE=explore`` draws fresh random examples to look
for new failures locally.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402  (after the thread settings, which torch reads when imported)
from hypothesis import settings  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
