"""The lean runtime: numpy, Pillow and one inference backend; never torch.

    from mordasr.runtime import Restorer
    restorer = Restorer("bundle/")
    result = restorer.restore(image)     # float32 (H, W, 3) in [0, 1]
"""

from mordasr.runtime.manifest import Manifest, load_manifest
from mordasr.runtime.pipeline import Restorer, RestoreResult

__all__ = ["Manifest", "RestoreResult", "Restorer", "load_manifest"]
