"""Settings of the S3-compatible endpoint: where it listens, who may sign, and what each bucket holds.

A bucket is bound to one served model and one KVBM layout, so a PUT's bytes have exactly one meaning.
Credentials come from the environment (``KVBM_CODEC_S3_ACCESS_KEY``, ``KVBM_CODEC_S3_SECRET_KEY``,
optionally ``KVBM_CODEC_S3_TENANT``; the tenant defaults to the access key), never from a file in
the image.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from kvbm_codec.api.types import DEFAULT_MODEL

DEFAULT_BUCKET = "kvbm-smollm2-135m"


class BucketBinding(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        DEFAULT_BUCKET, pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", description="S3 bucket name."
    )
    model: str = Field(DEFAULT_MODEL, description="Served model whose blocks this bucket holds.")
    layout: Literal["FullyContiguous"] = Field(
        "FullyContiguous",
        description="KVBM block layout of an object: [1, n_layers, 2, page_size, n_kv_heads*head_dim].",
    )
    page_size: int = Field(32, gt=0, description="Tokens per block; must equal the served model's.")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Element type of a block."
    )
    max_position: int = Field(
        32768, gt=0, description="Largest token position the RoPE position search considers for a block."
    )


class CredentialConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    access_key: str = Field(min_length=3, max_length=128)
    secret_key: SecretStr
    tenant: str | None = Field(None, description="Tenant of this key's objects (default: the access key).")


def _env_credentials() -> list[CredentialConfig]:
    ak, sk = os.environ.get("KVBM_CODEC_S3_ACCESS_KEY"), os.environ.get("KVBM_CODEC_S3_SECRET_KEY")
    if not ak or not sk:
        return []
    return [
        CredentialConfig(
            access_key=ak, secret_key=SecretStr(sk), tenant=os.environ.get("KVBM_CODEC_S3_TENANT")
        )
    ]


class S3Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(0, ge=0, le=65535, description="Port (0: any free port, see the handle's .port).")
    region: str = Field("us-east-1", description="Region clients sign for.")
    credentials: list[CredentialConfig] = Field(
        default_factory=_env_credentials, description="Accepted SigV4 keys (default: from the environment)."
    )
    buckets: list[BucketBinding] = Field(default_factory=lambda: [BucketBinding()])
    max_object_bytes: int = Field(
        64 << 20, gt=0, description="Largest request body accepted (EntityTooLarge beyond)."
    )
    max_uploads: int = Field(256, gt=0, description="Multipart uploads open at once (SlowDown beyond).")
    upload_ttl_s: float = Field(
        3600.0, gt=0, description="An unfinished multipart upload is dropped after this."
    )
    max_skew_s: float = Field(
        900.0, gt=0, description="Largest accepted clock difference of a signed request."
    )
    workers: int = Field(4, gt=0, description="Threads doing encode/decode (off the event loop).")

    @field_validator("buckets")
    @classmethod
    def _unique(cls, v: list[BucketBinding]) -> list[BucketBinding]:
        names = [b.name for b in v]
        if len(set(names)) != len(names):
            raise ValueError(f"bucket names must be unique, got {names}")
        return v

    @classmethod
    def coerce(cls, config: Any) -> S3Config:
        """Accept this model, a dict, or the service config's ``s3`` section (host/port only)."""
        if isinstance(config, S3Config):
            return config
        if isinstance(config, dict):
            return cls(**config)
        fields = {k: getattr(config, k) for k in cls.model_fields if getattr(config, k, None) is not None}
        return cls(**fields)
