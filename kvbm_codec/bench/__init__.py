"""One benchmark harness: KVTC against every baseline on the same real KV (issue 7).

Entry points: `kvbm_codec.bench.runner.run_bench` (library) and `kvbm-codec bench` (CLI, see
`kvbm_codec.bench.cli`). docs/bench-harness.md explains the methods and how accuracy is measured.
"""
