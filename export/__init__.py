"""ONNX export: component graphs, buckets, bundles with a manifest (``mordasr-export``)."""
