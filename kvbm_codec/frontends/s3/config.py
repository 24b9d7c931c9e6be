"""Settings of the S3-compatible endpoint: where it listens, who may sign, and what each bucket holds.

A bucket is bound to one served model and one KVBM layout, so a PUT's bytes have exactly one meaning.
Credentials come from the environment (``KVBM_CODEC_S3_ACCESS_KEY``, ``KVBM_CODEC_S3_SECRET_KEY``,
optionally ``KVBM_CODEC_S3_TENANT``; the tenant defaults to the access key), never from a file in
the image.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from kvbm_codec.service.config import BucketBinding


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
    max_uploads_per_tenant: int = Field(
        32,
        gt=0,
        description="Multipart uploads one tenant may hold open (SlowDown beyond; others unaffected).",
    )
    max_index_keys_per_tenant: int = Field(
        1_000_000, gt=0, description="Listing-index entries kept per tenant (oldest dropped beyond)."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="A request body must arrive within this (RequestTimeout, connection closed)."
    )
    idle_timeout_s: float = Field(
        60.0, gt=0, description="A keep-alive connection with no request for this long is closed."
    )
    require_signed_payload: bool = Field(
        False, description="Refuse UNSIGNED-PAYLOAD bodies: every body byte must be covered by a signature."
    )
    tls_cert: str | None = Field(None, description="PEM certificate: serve S3 over TLS (with tls_key).")
    tls_key: str | None = Field(None, description="PEM private key for tls_cert.")

    @model_validator(mode="after")
    def _tls_pair(self) -> S3Config:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        return self

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
