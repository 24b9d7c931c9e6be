"""The boto3 client every S3 test talks to the endpoint with.

Path-style addressing (the endpoint serves no per-bucket host names on 127.0.0.1) and one attempt
per request: a retry would hide the refusal or error a test is there to see."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config


def path_style_client(
    url: str, access_key: str, secret_key: str, region: str = "us-east-1", **config: Any
) -> Any:
    """A client for ``url``; ``config`` adds botocore ``Config`` options (timeouts, pool size)."""
    config.setdefault("retries", {"max_attempts": 1})
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(s3={"addressing_style": "path"}, **config),
    )
