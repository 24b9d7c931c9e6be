"""S3-compatible endpoint for KVBM's object tier (NIXL OBJ): see docs/kvbm.md."""

from kvbm_codec.frontends.s3.config import BucketBinding, CredentialConfig, S3Config
from kvbm_codec.frontends.s3.server import S3ServerHandle, start_s3_server

__all__ = ["BucketBinding", "CredentialConfig", "S3Config", "S3ServerHandle", "start_s3_server"]
