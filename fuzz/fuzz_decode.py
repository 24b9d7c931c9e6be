"""Fuzz KVTCCodec.decode (full decode: parser, inflate, dequantize, PCA, RoPE).  Usage:

.venv/bin/python -m fuzz.fuzz_decode -runs=1000000 -timeout=10 WORK_CORPUS_DIR SEED_DIR
"""

from fuzz.runner import main

if __name__ == "__main__":
    main("decode")
