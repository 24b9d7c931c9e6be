"""Adapters between engine/KVBM block layouts and the service's one block shape (`kvbm_codec.api.blocks`)."""
