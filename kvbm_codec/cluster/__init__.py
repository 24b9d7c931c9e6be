"""Many replicas as one tier: Dynamo discovery and client-side sharding."""
