"""Benchmarks (``mordasr-bench``): MoR variants against dense LoRA, measured side by side in one run."""
