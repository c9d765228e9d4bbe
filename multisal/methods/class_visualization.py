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
    r"""Class visualisation (Simonyan et al. 2013): an image synthesised by gradient ascent on a class score.

    Simonyan, Vedaldi and Zisserman 2013, "Deep Inside Convolutional Networks: Visualising Image
    Classification Models and Saliency Maps", section 2, in the recipe of Stanford's CS231n
    (assignment 3), whose jitter and blur are the regularisers of Yosinski et al. 2015. Starting
    from seeded standard normal noise in model space, the image I climbs the target's logit
    :math:`S_c` less an L2 penalty:

    .. math::
        I^* = \arg\max_I \; S_c(I) - \lambda \lVert I \rVert_2^2, \qquad
        I \leftarrow \mathrm{clip}\big(I + \mathrm{lr}\, (\nabla_I S_c(I) - 2 \lambda I)\big)

    Each step is taken on I rolled by a random (dy, dx) jitter in [0, max_jitter] (rolled back
    after), I is clipped to the preset's per-channel range of clean inputs, and every
    ``blur_every`` steps it is blurred with a Gaussian of sigma 0.5 pixel.

    Args:
        be: the backend (multisal.Backend) that runs the model (a classifier).
        target: the class c, one int.
        size: (height, width) of the image (default (224, 224)).
        preset: the model's preprocessing (a name or a Preset), which gives the clipping range and
            turns the result into pixels; default None: the backend's ``preset`` (one is needed).
        l2_reg: lambda, the L2 penalty's weight (default 1e-3).
        lr: the step size (default 25, CS231n's for SqueezeNet; smaller models may need less).
        iterations: the number of steps (default 100).
        blur_every: blur after every this many steps (default 10; 0 never blurs).
        max_jitter: the largest jitter in pixels along each axis (default 16).
        seed: the seed of the starting noise and of the jitter (default 0).
        channels: the model's input channels (default 3; the preset turns 3 into RGB pixels).
        progress: show a progress bar (default False).

    Returns:
        uint8 (H,W,3) RGB image.

    Example:
        >>> picture = ms.class_visualization(be, 2, size=(32, 32), iterations=10)
        >>> picture.shape, picture.dtype
        ((32, 32, 3), dtype('uint8'))
    """
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
