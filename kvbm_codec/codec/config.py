"""Codec parameters that change the bitstream; they travel inside the calibration artifact."""

from __future__ import annotations

import itertools
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

PAPER_GROUP_SIZES = (1, 16, 64, 256, 1024)


class CodecConfig(BaseModel):
    """Knobs of the KVTC transform. Sinks 4, window 128, groups 1..1024 and 16-bit scale/shift follow
    the KVTC paper. The basis layout departs from it (10-layer bases with per-head normalisation, not
    one global basis): the layout sweep in docs/benchmarks.md found the global basis best on text like
    the calibration corpus but clearly worse on out-of-domain validation text, and production text is
    never the calibration corpus."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sink_tokens: int = Field(4, ge=0, description="first positions kept uncompressed (attention sinks)")
    window_tokens: int = Field(128, ge=0, description="most recent tokens kept uncompressed")
    layer_group_size: int = Field(
        10,
        ge=0,
        description="layers sharing one PCA basis; 0 = all layers (one global basis, the paper's layout)",
    )
    rank_cap: int = Field(2048, ge=1, description="max principal components kept per basis")
    group_sizes: tuple[int, ...] = Field(
        PAPER_GROUP_SIZES, description="scale/shift group sizes the DP may use"
    )
    max_bits: int = Field(8, ge=1, le=8, description="widest code the DP may choose")
    scale_bits: int = Field(
        32, description="bits of one group's side information: fp16 scale + fp16 shift (16: symmetric)"
    )
    quantizer: Literal["minmax", "symmetric", "ecsq"] = Field(
        "minmax",
        description="'minmax': each group's own min and max (the paper's fp16 shift + scale); "
        "'symmetric': +-max|x|, the fp16 scale only (half the side information, scale_bits 16; "
        "docs/benchmarks.md, 'Session 24'); 'ecsq': one uniform step per basis scaled by a per-token "
        "gain, codes ANS-coded with calibrated tables instead of bit widths (codec/ecsq.py; "
        "docs/benchmarks.md, 'Session 25')",
    )
    key_weight: float = Field(1.0, gt=0, description="weight of key MSE against value MSE in the DP")
    normalize_heads: bool = Field(
        True,
        description="scale each layer/head to unit variance before PCA (equalises relative error "
        "across layers; see the layout sweep in docs/benchmarks.md)",
    )
    undo_rope: bool = Field(True, description="de-rotate keys before PCA (False only for ablations)")
    distortion: Literal["mse", "attention", "attention_shape"] = Field(
        "attention",
        description="what the PCA and the DP minimise: 'mse' on normalised features; 'attention': key "
        "error as attention-logit error (calibrated query energy per rotary pair) and value error after "
        "o_proj, per-layer sensitivity from the residual stream (the default: better than mse on validation "
        "text, docs/benchmarks.md); 'attention_shape': those weights within each head only "
        "(calibration/statistics.py)",
    )
    layer_sensitivity: Literal["analytic", "measured"] = Field(
        "measured",
        description="how the metric weighs layers and keys against values: 'analytic' from local "
        "first-order arguments; 'measured': calibration probes each layer's real codec error end to end "
        "(output KL on held-out calibration text) and rescales the metric per layer and kind "
        "(calibration/sensitivity.py). The default with distortion 'attention' (lower KL than 'analytic' "
        "on every validation text, docs/benchmarks.md); the other metrics are always 'analytic'",
    )
    sensitivity_power: float = Field(
        0.5,
        gt=0,
        le=1,
        description="measured factors are raised to this power (1: as measured; 0.5, the default, "
        "square-roots them: better than 1 on validation text)",
    )
    sensitivity_heads: bool = Field(
        False,
        description="measured factors per KV head instead of per layer (the probe runs once per head: "
        "3x as long for SmolLM2); docs/benchmarks.md, 'Seventh pass'",
    )

    @model_validator(mode="before")
    @classmethod
    def _analytic_unless_attention(cls, data: object) -> object:
        """The measured default rescales the attention metric; mse and attention_shape have no layer
        scale to rescale, so they stay analytic unless asked otherwise (and then are refused)."""
        attention = isinstance(data, dict) and data.get("distortion", "attention") == "attention"
        if isinstance(data, dict) and not attention and "layer_sensitivity" not in data:
            return {**data, "layer_sensitivity": "analytic"}
        return data

    @model_validator(mode="before")
    @classmethod
    def _symmetric_side_bits(cls, data: object) -> object:
        """A symmetric group stores one fp16 value: the DP's rate is 16 bits unless said otherwise."""
        if isinstance(data, dict) and data.get("quantizer") == "symmetric" and "scale_bits" not in data:
            return {**data, "scale_bits": 16}
        return data

    @model_validator(mode="after")
    def _sensitivity_needs_a_metric(self) -> CodecConfig:
        if self.layer_sensitivity == "measured" and self.distortion != "attention":
            raise ValueError(
                "layer_sensitivity='measured' rescales a metric: it needs distortion 'attention'"
            )
        if self.sensitivity_heads and self.layer_sensitivity != "measured":
            raise ValueError(
                "sensitivity_heads splits measured factors: it needs layer_sensitivity='measured'"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_unset_heads(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict:
        """Per-layer factors (False) and min/max groups serialise as before those fields existed, so
        every cache key, artifact header and calibration id of those recipes stays what it was."""
        data = handler(self)
        if not self.sensitivity_heads:
            data.pop("sensitivity_heads", None)
        if self.quantizer == "minmax":  # likewise: min/max recipes keep their keys and ids
            data.pop("quantizer", None)
        return data

    @field_validator("group_sizes")
    @classmethod
    def _sizes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        v = tuple(sorted(set(v)))
        if not v or v[0] != 1:
            raise ValueError("group_sizes must be positive and include 1 (so any rank can be tiled)")
        if any(b % a for a, b in itertools.pairwise(v)):
            raise ValueError(f"group_sizes must form a divisibility chain (each divides the next), got {v}")
        return v

    def layer_groups(self, n_layers: int) -> list[tuple[int, int]]:
        g = self.layer_group_size or n_layers
        return [(a, min(a + g, n_layers)) for a in range(0, n_layers, g)]
