"""Coverage-guided fuzzing of the frame parser and the KVTC decoder (docs/reliability.md)."""
