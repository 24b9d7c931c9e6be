"""The block contract every layer speaks: spec and layout, request types, protocols, errors."""
