"""ONNX graph tools shared by the exporter and by calibration: the lint of the operators TensorRT
parses (``lint``), the per-bucket weight packs of folded bundles (``packs``), and the size past
which a graph keeps its weights in an external data file (protobuf cannot hold 2 GB)."""

# Protobuf cannot serialise a message past 2 GiB; stay well under it (sd21's UNet is ~3.4 GB fp32).
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of initializers past which weights go to <graph>.onnx.data
