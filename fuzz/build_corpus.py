"""Build the fuzzers' seed corpus: short frames encoded from real SmolLM2-135M KV.

Seeds are real encoder output (not hand-made bytes) so mutations start from frames that reach
every decoder stage; they are short (4-32 tokens, one to five layer groups, 2.7-24 KB) so one
execution costs milliseconds. A small calibration (4 x 512 tokens, 6-layer groups) keeps the build to about a
minute. Everything goes under ``<cache>/fuzz`` (``KVBM_CODEC_CACHE_DIR``), not into git.

    .venv/bin/python -m fuzz.build_corpus [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch

from kvbm_codec.calibration.cache import cache_dir


def default_dir() -> Path:
    return cache_dir() / "fuzz"


def calibration_path(root: Path) -> Path:
    return root / "calibration.kvtc"


def seeds_dir(root: Path) -> Path:
    return root / "seeds"


def build_small_calibration(lm: object, quantizer: str = "minmax"):  # -> Calibration (lazy imports)
    from kvbm_codec.calibration.calibrate import calibrate_small

    return calibrate_small(lm, quantizer=quantizer)  # type: ignore[arg-type]


def make_seeds(codec: object, kv: object) -> dict[str, bytes]:
    """Frames covering each decoder branch: sinks stored raw, no raw tokens, all raw, several
    layer groups, non-contiguous positions, every output dtype and both allocations."""
    from kvbm_codec.codec.kvtc import KVTCCodec
    from kvbm_codec.kv import KVCache

    assert isinstance(codec, KVTCCodec) and isinstance(kv, KVCache)
    other = KVTCCodec(codec.cal, 8.0)

    def sub(tokens: list[int], lo: int, hi: int) -> KVCache:
        return kv.select_tokens(torch.tensor(tokens)).select_layers(lo, hi)

    def none(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.bool)

    seeds = {
        "g0_sinks_8tok": codec.encode(sub(list(range(2, 10)), 0, 6), window_tokens=0),
        "g1_16tok": codec.encode(sub(list(range(16, 32)), 6, 12), none(16)),
        "all_layers_8tok": codec.encode(sub(list(range(40, 48)), 0, 30), none(8)),
        "g2_gaps_8tok": codec.encode(sub([4, 5, 6, 10, 11, 12, 13, 20], 12, 18), none(8)),
        "g3_all_raw_4tok": codec.encode(sub(list(range(4)), 18, 24), torch.ones(4, dtype=torch.bool)),
        "g4_bf16_8tok": codec.encode(sub(list(range(3, 11)), 24, 30), window_tokens=0, dtype="bfloat16"),
        "g0_f32_8tok": codec.encode(sub(list(range(24, 32)), 0, 6), none(8), dtype="float32"),
        "g1_8x_32tok": other.encode(sub(list(range(32, 64)), 6, 12), window_tokens=1),
    }
    # version-2 block frames (binary header, implied section layout), as the service writes them
    whole = sub(list(range(32)), 0, kv.n_layers)
    seeds["v2_block_sinks_32tok"] = codec.encode_batch([whole], [whole.positions < 4])[0][0]
    later = sub(list(range(32, 48)), 0, kv.n_layers)
    seeds["v2_block_16tok"] = codec.encode_batch([later], [none(16)])[0][0]
    seeds["v2_block_bf16_8tok"] = codec.encode_batch(
        [sub(list(range(48, 56)), 0, kv.n_layers)], [none(8)], dtype="bfloat16"
    )[0][0]
    return seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=default_dir())
    ap.add_argument(
        "--quantizer",
        choices=("minmax", "symmetric", "ecsq"),
        default="minmax",
        help="the small calibration's quantizer (ecsq: ANS code streams, v1 and v2 frames)",
    )
    args = ap.parse_args()
    from kvbm_codec.calibration.artifact import load_calibration, save_calibration
    from kvbm_codec.codec.kvtc import KVTCCodec
    from kvbm_codec.models.hf import CausalLM
    from kvbm_codec.texts import calibration_texts

    lm = CausalLM.load()
    cal_file = calibration_path(args.out)
    if cal_file.exists():
        cal = load_calibration(cal_file, expected_fingerprint=lm.info.fingerprint)
        if cal.config.quantizer != args.quantizer:
            raise SystemExit(f"{cal_file} is a {cal.config.quantizer} calibration; use another --out")
    else:
        cal = build_small_calibration(lm, args.quantizer)
        save_calibration(cal, cal_file)
    text = calibration_texts()[7]
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :64]
    kv, _ = lm.prefill(ids, return_logits=False)
    out = seeds_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in make_seeds(KVTCCodec(cal, 20.0), kv).items():
        (out / f"{name}.kvtc").write_bytes(data)
        print(f"{name}: {len(data)} bytes sha256:{hashlib.sha256(data).hexdigest()[:16]}")
    print(f"calibration {cal.calibration_id} at {cal_file}; seeds in {out}")


if __name__ == "__main__":
    main()
