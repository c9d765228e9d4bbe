"""Saliency-seeded segmentation (Simonyan et al. 2013, section 3.1): GrabCut whose foreground
model is seeded by the most salient pixels (above the `threshold` quantile of the map) and whose
background model by the least salient (below the `background` quantile)."""
import numpy as np

from ..errors import MultisalError
from ..frameworks import lazy_import
from ..maps import resize_maps

cv2 = lazy_import("cv2")

# GrabCut converges in a handful of iterations (5 by default); more than this is a typo, and each
# one costs a pass over every pixel.
MAX_ITERATIONS = 1000


def segment(image, saliency, threshold=0.95, background=0.3, iterations=5, smooth=True):
    r"""Saliency-seeded segmentation (Simonyan et al. 2013): GrabCut seeded by a map's most and least salient pixels.

    Simonyan, Vedaldi and Zisserman 2013, "Deep Inside Convolutional Networks", section 3.1: the
    saliency map s (blurred first with ``smooth``) labels every pixel p for GrabCut (Rother,
    Kolmogorov and Blake 2004), with :math:`q_\tau` the :math:`\tau`-quantile of s over the
    image:

    .. math::
        \mathrm{seed}(p) = \begin{cases}
            \text{foreground} & s_p \ge q_{\text{threshold}} \\
            \text{background} & s_p \le q_{\text{background}} \\
            \text{probable foreground} & s_p \ge q_{0.5} \\
            \text{probable background} & \text{otherwise}
        \end{cases}

    GrabCut then fits its colour models from these seeds and relabels the probable pixels; the
    foreground and background seeds keep their labels.

    Args:
        image: the photo, HWC uint8 RGB (a preset's ``invert()`` gives it from model inputs).
        saliency: a 2-D (h,w) map of that image, resized to the image (bilinear) if its size
            differs.
        threshold: the quantile above which pixels are foreground seeds (default 0.95).
        background: the quantile below which pixels are background seeds (default 0.3; needs
            0 <= background < threshold <= 1).
        iterations: GrabCut's iterations (default 5; 1..1000).
        smooth: blur the map first with a Gaussian of sigma max(1, 2% of the image's longer side)
            (default True), so the quantiles pick regions rather than speckles.

    Returns:
        bool (H,W) mask, True on the foreground (seeded or probable).

    Example:
        >>> photo = ms.get_preset("raw").invert(x[0])
        >>> mask = ms.segment(photo, ms.vanilla_gradient(be, x)[0])
        >>> mask.shape, mask.dtype
        ((32, 32), dtype('bool'))
    """
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
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) \
            or not 1 <= iterations <= MAX_ITERATIONS:
        raise MultisalError(f"iterations={iterations!r} must be an integer 1..{MAX_ITERATIONS}")
    if not all(isinstance(q, (int, float, np.number)) and not isinstance(q, bool) for q in (background, threshold)) \
            or not 0 <= background < threshold <= 1:
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
