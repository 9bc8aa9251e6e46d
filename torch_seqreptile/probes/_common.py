"""What the probes share: kept ``training`` flags and seeded random streams."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from torch import nn


@contextmanager
def training_flags_kept(model: nn.Module) -> Iterator[None]:
    """On exit (also on an error), every module of ``model`` gets back its ``training`` flag."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def seeded_rng(seed: int, *key: int) -> np.random.Generator:
    """The random stream ``key`` of ``seed``: PCG64 on ``SeedSequence(seed, spawn_key=key)``.

    This is the stream that NumPy's ``SeedSequence(seed).spawn`` tree gives the child at
    ``key``: streams of different keys are statistically independent, and all 128 bits of
    the generator's state come from NumPy's hash of ``(seed, key)``, so distinct keys get
    unrelated streams (a derived integer seed such as ``seed * c + index`` can repeat one,
    and torch's CPU generator keeps only 32 bits of a seed). The global NumPy and torch
    generators are not used.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))
