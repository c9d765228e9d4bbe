"""Saliency-seeded segmentation (Simonyan et al. 2013, section 3.1): GrabCut whose foreground
model is seeded by the most salient pixels (above the `threshold` quantile of the map) and whose
background model by the least salient (below the `background` quantile)."""
import numpy as np

from ..errors import MultisalError
from ..frameworks import lazy_import
from ..maps import resize_maps

cv2 = lazy_import("cv2")


def segment(image, saliency, threshold=0.95, background=0.3, iterations=5, smooth=True):
    """image: HWC uint8 RGB; saliency: (H,W) map (resized to the image if needed) -> bool mask (H,W)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise MultisalError(f"segment() needs an HWC uint8 RGB image, got {image.dtype} {image.shape}")
    sal = np.asarray(saliency, dtype=np.float32)
    if sal.ndim != 2:
        raise MultisalError(f"segment() needs a 2-D saliency map (H,W), got shape {sal.shape}")
    if not np.isfinite(sal).all():
        raise MultisalError("segment() got a saliency map with NaN or infinite values")
    if sal.min() == sal.max():
        raise MultisalError("segment() got a constant saliency map: no pixel is more salient than another")
    if not 0 <= background < threshold <= 1:
        raise MultisalError(f"need 0 <= background ({background}) < threshold ({threshold}) <= 1 (quantiles)")
    h, w = image.shape[:2]
    if sal.shape != (h, w):
        sal = resize_maps(sal, (h, w))
    if smooth:
        # Gradient maps are speckled; a blur over ~2% of the image makes the quantiles pick regions.
        s = max(1.0, 0.02 * max(h, w))
        sal = cv2.GaussianBlur(sal, (0, 0), s)
    fg, bg = np.quantile(sal, [threshold, background])
    mask = np.where(sal >= np.median(sal), cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    mask[sal >= fg] = cv2.GC_FGD
    mask[sal <= bg] = cv2.GC_BGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), mask, None, bgd, fgd, int(iterations), cv2.GC_INIT_WITH_MASK)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
