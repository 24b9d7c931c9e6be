"""End-to-end demonstrations, not library code: the codec on a conversation, KVBM offload via a server."""
