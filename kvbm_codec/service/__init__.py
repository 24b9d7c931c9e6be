"""Service-wide settings and log format, read by every server-side package (config.py, logging.py)."""
