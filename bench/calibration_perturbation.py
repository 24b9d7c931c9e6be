"""How far an equivalent-but-different fit moves a calibration: the noise floor of a recipe A/B.

The default recipe (float32 prefills) is calibrated with Gaussian noise added to every fit prefill's
KV, at a given relative power per layer and head (default: keys 2e-4, values 8e-4, the divergence a
bf16 copy of SmolLM2 showed from the float32 model on 1024 tokens). Scoring the result with
bench/accuracy_sweep.py beside the plain and the bf16-prefill calibrations tells whether their gap is
bigger than any small perturbation of the fit data would cause (docs/benchmarks.md, "Session 21:
calibration prefills in bf16"). The held-out prefill and the probe stay exact.

    python bench/calibration_perturbation.py --out /tmp/cn/broad-measured@0.5.kvtc
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import kvbm_codec.calibration.calibrate as calibrate_module
from kvbm_codec.calibration.artifact import save_calibration
from kvbm_codec.calibration.cache import DEFAULT_FIT_SEQUENCES, corpus_texts, fit_plan
from kvbm_codec.core.matmul import configure_fp32_matmul
from kvbm_codec.kv import KVCache
from kvbm_codec.models.hf import CausalLM


class NoisyPrefills:
    """``lm`` whose prefill_kv adds noise of ``key_power`` / ``value_power`` x each (layer, head)'s
    mean square; everything else (tokenizer, info, the hooked model) is ``lm``'s."""

    def __init__(self, lm: CausalLM, key_power: float, value_power: float, seed: int) -> None:
        self.lm, self.tokenizer, self.info, self.model = lm, lm.tokenizer, lm.info, lm.model
        self.powers = (key_power, value_power)
        self.generator = torch.Generator().manual_seed(seed)

    def _noisy(self, x: torch.Tensor, power: float) -> torch.Tensor:
        scale = (x.pow(2).mean(dim=(2, 3), keepdim=True) * power).sqrt()
        return x + torch.randn(x.shape, generator=self.generator) * scale

    def prefill_kv(self, input_ids: torch.Tensor) -> KVCache:
        kv = self.lm.prefill_kv(input_ids)
        k, v = self.powers
        return KVCache(self._noisy(kv.keys, k), self._noisy(kv.values, v), kv.positions, kv.layer_start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True, help="the calibration file to write")
    p.add_argument("--key-power", type=float, default=2e-4)
    p.add_argument("--value-power", type=float, default=8e-4)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    configure_fp32_matmul()
    lm = CausalLM.load()
    noisy = NoisyPrefills(lm, a.key_power, a.value_power, a.seed)
    calibrate_module._fit_model = lambda model, dtype: noisy  # only the fit prefills get the noise
    texts, name = corpus_texts(lm.tokenizer, "broad")
    plan = fit_plan("broad", DEFAULT_FIT_SEQUENCES["broad"])
    cal = calibrate_module.calibrate(lm, texts, fit_sequences=plan, text_source=name)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_calibration(cal, a.out)
    print(cal.calibration_id)


if __name__ == "__main__":
    main()
