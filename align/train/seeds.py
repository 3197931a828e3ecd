"""Seeds derived from integers, so that every sample of a run is reproducible wherever it is drawn."""

from __future__ import annotations

import numpy as np
import torch


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seeded(*parts: int) -> torch.Generator:
    """A CPU generator seeded with :func:`sample_seed` of ``parts``."""
    return torch.Generator().manual_seed(sample_seed(*parts))
