"""Benchmarks (``mordasr-bench``): not implemented yet; see the open benchmark issue."""
