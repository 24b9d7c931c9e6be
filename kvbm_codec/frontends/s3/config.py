"""Settings of the S3-compatible endpoint. They are the service config's ``s3`` section
(``service.config.S3Config``): one class, so the endpoint's knobs, their environment names and the
Helm schema cannot drift apart. Named here for the front end's callers."""

from __future__ import annotations

from kvbm_codec.service.config import BucketBinding, CredentialConfig, S3Config

__all__ = ["BucketBinding", "CredentialConfig", "S3Config"]
