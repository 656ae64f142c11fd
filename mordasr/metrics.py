"""Image-quality metrics, one definition each (no torch needed; torch tensors are accepted).

- ``psnr`` and ``ssim``: of float images in [0, 1] (clipped), the quick check that training
  curves, accuracy reports, benchmarks and the demo print (SSIM with scikit-image's defaults over
  RGB). ``bicubic_upsample``: the baseline every table is measured against.
- ``score``: the metrics published SR tables report.

  - Images are 8-bit first (outputs are saved as 8-bit images, so they are scored that way).
  - Y channel of ITU-R BT.601 in the studio range, as MATLAB's ``rgb2ycbcr``:
    ``Y = 16 + (65.481 R + 128.553 G + 24.966 B)`` with R, G, B in [0, 1], not rounded.
  - ``scale`` pixels are cropped from every border before PSNR and SSIM.
  - PSNR = 10 log10(255^2 / MSE); SSIM with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
    K2 = 0.03, L = 255 (Wang et al. 2004, the reference implementation's settings).
  - Colour shift: CIEDE2000 between the mean colours of the two images (in CIELAB, D65), which
    catches a restorer that turns green leaves grey without being fooled by texture.
"""

from __future__ import annotations

import numpy as np

from mordasr.runtime.images import to_uint8


def y_channel(image: np.ndarray) -> np.ndarray:
    """BT.601 luma in [16, 235] (float64) of an 8-bit (or [0, 1] float) RGB image."""
    rgb = image.astype(np.float64) / 255 if image.dtype == np.uint8 else to_uint8(image) / 255.0
    return 16 + rgb @ np.array([65.481, 128.553, 24.966])


def _shave(a: np.ndarray, border: int) -> np.ndarray:
    return a[border:-border, border:-border] if border else a


def _array(image) -> np.ndarray:
    """A numpy array of an array or a torch tensor (detached, on the CPU)."""
    return image.detach().float().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)


def psnr(a, b, data_range: float = 1.0) -> float:
    """10 log10(data_range^2 / MSE), both clipped to [0, data_range] (inf when equal)."""
    a = np.clip(_array(a).astype(np.float64), 0, data_range)
    b = np.clip(_array(b).astype(np.float64), 0, data_range)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def ssim(a, b, data_range: float = 1.0) -> float:
    """SSIM of two (H, W, 3) images in [0, data_range] over RGB, scikit-image's defaults (7x7 window)."""
    from skimage.metrics import structural_similarity

    a, b = (np.clip(_array(x).astype(np.float64), 0, data_range) for x in (a, b))
    return float(structural_similarity(b, a, channel_axis=-1, data_range=data_range))


def bicubic_upsample(lr: np.ndarray, scale: int) -> np.ndarray:
    """PIL's bicubic upsampling of the 8-bit LR image, float32 in [0, 1]: the baseline."""
    from PIL import Image

    h, w = lr.shape[:2]
    up = Image.fromarray(to_uint8(lr)).resize((w * scale, h * scale), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 255


def psnr_y(output: np.ndarray, reference: np.ndarray, border: int) -> float:
    return psnr(_shave(y_channel(output), border), _shave(y_channel(reference), border), 255.0)


def ssim_y(output: np.ndarray, reference: np.ndarray, border: int) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(_shave(y_channel(output), border), _shave(y_channel(reference), border),
                                       data_range=255.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def psnr_rgb(output: np.ndarray, reference: np.ndarray, border: int = 0) -> float:
    return psnr(_shave(to_uint8(output), border), _shave(to_uint8(reference), border), 255.0)


def colour_shift(output: np.ndarray, reference: np.ndarray) -> float:
    """CIEDE2000 between the images' mean colours (0: same mean colour; about 2.3: just noticeable)."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    def mean_lab(image: np.ndarray) -> np.ndarray:
        return rgb2lab(to_uint8(image).reshape(-1, 3).mean(axis=0)[None, None] / 255.0)[0, 0]

    return float(deltaE_ciede2000(mean_lab(output), mean_lab(reference)))


def score(output: np.ndarray, reference: np.ndarray, border: int) -> dict[str, float]:
    """Every metric of one restored image against its HR reference (same shape, HWC)."""
    if output.shape != reference.shape:
        raise ValueError(f"output {output.shape} and reference {reference.shape} differ in shape")
    return {"psnr_y": psnr_y(output, reference, border), "ssim_y": ssim_y(output, reference, border),
            "psnr_rgb": psnr_rgb(output, reference, border), "colour_shift": colour_shift(output, reference)}
