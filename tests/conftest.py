"""Shared fixtures. The real model is loaded once per session: even from the cache it costs seconds."""

from __future__ import annotations

import pytest

from kvbm_codec.core.matmul import configure_fp32_matmul
from kvbm_codec.models.hf import CausalLM

# Tests run float32 matmuls the way every kvbm-codec command does (core/matmul.py): on oneDNN's bf16
# path where this CPU has it and it proves exact, torch's default elsewhere (KVBM_CODEC_FP32_MATMUL=ieee
# runs the suite on the default path anywhere).
configure_fp32_matmul()


@pytest.fixture(scope="session")
def smollm() -> CausalLM:
    """The default model (SmolLM2-135M), float32 on CPU; the first run also builds the on-disk cache."""
    return CausalLM.load()


@pytest.fixture(scope="session")
def small_calibration(smollm: CausalLM, tmp_path_factory: pytest.TempPathFactory):
    """A real but small calibration (4 x 512 tokens, 6-layer bases), shared by every test module that
    needs one: a default global calibration costs minutes on 2 cores, this one seconds."""
    from kvbm_codec.calibration.artifact import save_calibration
    from kvbm_codec.calibration.calibrate import calibrate_small

    cal = calibrate_small(smollm)
    save_calibration(cal, tmp_path_factory.mktemp("calibration") / "small.kvtc")
    return cal


@pytest.fixture(scope="session")
def small_ecsq_calibration(smollm: CausalLM):
    """The small calibration's recipe with the entropy-coded quantizer (quantizer="ecsq"): its code
    tables and steps are fitted on top of the same bases (tests/test_ecsq.py, the fuzz seeds)."""
    from kvbm_codec.calibration.calibrate import calibrate_small

    return calibrate_small(smollm, quantizer="ecsq")


@pytest.fixture(scope="session")
def qwen() -> CausalLM:
    """Qwen2.5-Coder-0.5B-Instruct, float32 on CPU; every test that loads it shares the one cached
    conversion of its GGUF (the first load re-assembles the six parts and converts, ~1.5 min)."""
    return CausalLM.load("qwen2.5-coder-0.5b")
