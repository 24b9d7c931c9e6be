"""Fuzz read_frame / Frame.verify / inspect_frame.  Usage (seed dir as libFuzzer corpus):

.venv/bin/python -m fuzz.fuzz_parse -runs=1000000 -timeout=10 WORK_CORPUS_DIR SEED_DIR
"""

from fuzz.runner import main

if __name__ == "__main__":
    main("parse")
