"""Smooth Grad-CAM++ (Omeiza et al. 2019): Grad-CAM++ with the gradient's first three powers
averaged over noisy copies of the input (D1, D2, D3); the activation comes from the clean input.
Maps of single feature maps (`filters`) and of chosen neurons (`neurons`, `region`) as in the
paper's code."""
import numpy as np

from ..backend import check_input
from ..errors import MultisalError
from ..noise import DEFAULT_NOISE_LEVEL, average_over_noise
from ..objectives import check_objective, expand_target, same_pass_target
from .cam import cam_layer, check_4d, finish, gradcam_pp_weights


def smooth_gradcam_pp(be, x, target=None, layer=None, n=4, noise_level=DEFAULT_NOISE_LEVEL, sigma=None,
                      seed=0, filters=None, neurons=None, region=False, upsample=True, normalize=True,
                      objective="logit", noise="normal", batch_size=None, progress=False, preset=None):
    """n=0 uses the clean input's gradients alone (plain Grad-CAM++)."""
    check_objective(objective)
    x = check_input(x)
    layer = cam_layer(be, x, layer)
    # A always comes from the clean input; with n=0 so do the derivatives. The clean pass also
    # decides a target of None (its argmax).
    if n == 0:
        clean = be.run(x, objective, same_pass_target(target, len(x)), layers=[layer])
    else:
        clean = be.run(x, layers=[layer])
        target = expand_target(target, len(x))
        if target is None:
            target = clean.outputs.argmax(axis=1).astype(np.int64)
    A = clean.activations[layer].astype(np.float64)
    check_4d(layer, A)
    if n == 0:
        g = clean.gradients[layer].astype(np.float64)
        d1, d2, d3 = g, g ** 2, g ** 3
    else:
        def moments(noisy, images):
            chunk_target = target[images] if isinstance(target, np.ndarray) else target
            g = be.run(noisy, objective, chunk_target, layers=[layer]).gradients[layer].astype(np.float64)
            return g, g ** 2, g ** 3

        d1, d2, d3 = average_over_noise(moments, be, x, n=n, noise_level=noise_level, sigma=sigma, noise=noise,
                                        seed=seed, batch_size=batch_size, progress=progress, preset=preset,
                                        desc="smooth_gradcam_pp")
    weights = gradcam_pp_weights(A, d1, d2, d3)
    mask = None if not neurons else neuron_mask(neurons, region, A.shape[2:])
    return finish(A, weights, x.shape, upsample, normalize, filters=filters, mask=mask)


def neuron_mask(neurons, region, shape):
    """Where the activations are kept: the listed (row, col) points, or with region=True the box
    between the first two points (inclusive)."""
    h, w = shape
    mask = np.zeros((h, w), dtype=np.float64)
    points = []
    for p in neurons:
        try:
            r, c = (v.__index__() for v in p)   # integers only: (1.5, 2) is no neuron
        except (TypeError, ValueError, AttributeError):
            raise MultisalError(f"neuron {p!r} is not a (row, col) pair of integers") from None
        points.append((r, c))
    for r, c in points:
        if not (0 <= r < h and 0 <= c < w):
            raise MultisalError(f"neuron ({r}, {c}) is outside the layer's {h}x{w} map")
    if region:
        if len(points) < 2:
            raise MultisalError("region=True needs two neurons, the corners of a box")
        (r0, c0), (r1, c1) = points[:2]
        mask[min(r0, r1):max(r0, r1) + 1, min(c0, c1):max(c0, c1) + 1] = 1
    else:
        for r, c in points:
            mask[r, c] = 1
    return mask
