"""The transport-agnostic core: BlockService (admission, codec per served model, store, metrics)."""
