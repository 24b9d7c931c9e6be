"""The gRPC front end: server, client, and its TLS/token authentication."""
