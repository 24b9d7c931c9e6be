"""`python -m kvbm_codec ...` == the `kvbm-codec` command (used where the console script is not on PATH)."""

from kvbm_codec.cli import app

if __name__ == "__main__":  # not when a spawned codec worker re-imports the main module
    app()
