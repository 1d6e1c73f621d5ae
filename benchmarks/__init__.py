"""Benchmarks (not part of the test run): ``python -m benchmarks [ingest|incremental|memory|
retrieval|generation|all]``.  Each prints ratios measured side by side in the same run plus the
absolute figures and the hardware they came from."""
