"""Test-suite settings.

Property tests (hypothesis) are derandomized by default: every run draws the same examples (seeded
from each test's name), so CI cannot fail on one draw and pass on the next.  Their reach is kept
(the same number of examples, the same strategies), and cases found once are pinned with
``@example``.  ``HYPOTHESIS_PROFILE=explore`` draws fresh random examples to look
for new failures locally.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
