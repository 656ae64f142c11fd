"""Reduced precisions for bundles: FP16 graphs and INT8 graphs with explicit Q/DQ, calibrated per
degradation bucket, each with an accuracy report against FP32 PyTorch (``mordasr-calib``)."""
