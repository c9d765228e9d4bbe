"""Class visualisation (Simonyan et al.; cs231n's recipe): synthesise an image the model scores as
the target class, by gradient ascent on score - l2_reg * ||I||^2 from random noise, with a random
jitter before each step (undone after), clamping to the valid pixel range and a light blur as
implicit regularisers."""
import numpy as np

from ..errors import MultisalError
from ..frameworks import lazy_import
from ..presets import check_size, get_preset
from ..progress import progress_bar

cv2 = lazy_import("cv2")


def _blur(img, sigma):
    # cs231n blurs with a Gaussian of sigma 0.5 along H and W (scipy's default truncation: 4 sigma).
    k = 2 * int(4 * sigma + 0.5) + 1
    return np.stack([cv2.GaussianBlur(c, (k, k), sigma, borderType=cv2.BORDER_REFLECT) for c in img])


# More gradient steps than this is a typo.
MAX_STEPS = 100_000


def class_visualization(be, target, size=(224, 224), preset=None, l2_reg=1e-3, lr=25, iterations=100,
                        blur_every=10, max_jitter=16, seed=0, channels=3, progress=False):
    """-> HWC uint8 RGB image maximising the target's logit."""
    preset = preset if preset is not None else getattr(be, "preset", None)
    if preset is None:
        raise MultisalError("class_visualization needs preset= (the model's preprocessing, e.g. 'efficientnet-lite')")
    preset = get_preset(preset)
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise MultisalError(f"class_visualization target must be one class index, got {target!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or not 0 <= iterations <= MAX_STEPS:
        raise MultisalError(f"iterations={iterations!r} must be an integer 0..{MAX_STEPS}")
    size = check_size(size)
    rng = np.random.default_rng(seed)
    height, width = size
    img = rng.standard_normal((channels, height, width)).astype(np.float32)
    lo, hi = (np.asarray(v, np.float32)[:, None, None] for v in preset.channel_range)
    tgt = np.array([int(target)])
    for t in progress_bar(range(int(iterations)), desc="class_visualization", enabled=progress):
        oy, ox = rng.integers(0, max_jitter + 1, size=2)
        img = np.roll(img, (oy, ox), axis=(1, 2))
        g = be.run(img[None], "logit", tgt, input_grad=True).input_grad[0]
        img = img + lr * (g - 2 * l2_reg * img)
        img = np.roll(img, (-oy, -ox), axis=(1, 2))
        img = np.clip(img, lo, hi)
        if blur_every and t % blur_every == 0:
            img = _blur(img, 0.5)
    return preset.invert(img)
