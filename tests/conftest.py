"""Shared fixtures. The real model is loaded once per session: even from the cache it costs seconds."""

from __future__ import annotations

import pytest

from kvbm_codec.models.hf import CausalLM


@pytest.fixture(scope="session")
def smollm() -> CausalLM:
    """The default model (SmolLM2-135M), float32 on CPU; the first run also builds the on-disk cache."""
    return CausalLM.load()
