"""vLLM integration: the CPU chunk layout, a CPU tiering spec and the kvbm-codec secondary tier."""
