"""Front ends: protocol translators over the core (gRPC + NIXL data plane, S3-compatible endpoint)."""
