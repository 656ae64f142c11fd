"""mordasr: MoR-DASR one-step diffusion super-resolution, from PyTorch to ONNX/TensorRT and a lean runtime.

Subpackages: ``model`` (PyTorch model), ``training``, ``export`` (ONNX + manifest), ``calib``
(precisions), ``runtime`` (torch-free inference), ``benchmarks``.
"""

__version__ = "0.1.0"
