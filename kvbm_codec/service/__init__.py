"""The codec tier service: transport-agnostic core (core.py) and its front ends (gRPC, NIXL, S3)."""
