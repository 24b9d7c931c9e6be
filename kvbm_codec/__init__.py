"""kvbm-codec: KV-cache transform coding (KVTC) as a KVBM storage tier."""

__version__ = "0.1.0"
