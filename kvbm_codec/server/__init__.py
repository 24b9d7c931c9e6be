"""Process wiring: build a service from config, start its front ends, the `serve`/client CLI."""
