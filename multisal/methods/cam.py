"""Class activation maps weighted by gradients: Grad-CAM, Grad-CAM++ and Smooth Grad-CAM++.

All three share one shape: take the activation A (N,K,h,w) of a layer and per-channel weights
w (N,K), and return relu(sum_k w_k A_k). They differ only in how w comes from the gradients:
- Grad-CAM (Selvaraju et al.): w_k = mean_ij g_ij.
- Grad-CAM++ (Chattopadhay et al.): alpha_ij = g^2 / (2 g^2 + sum_ab(A_ab) g^3), zero where g = 0,
  w_k = sum_ij alpha_ij relu(g_ij).
- Smooth Grad-CAM++ (Omeiza et al.): the same with g, g^2, g^3 replaced by their means D1, D2, D3
  over noisy copies of the input; A comes from the clean input.
"""
import numpy as np

from ..errors import MultisalError
from ..maps import add_per_image, resize_maps, scale_01
from ..noise import DEFAULT_NOISE_LEVEL, NoiseStream, resolve_sigma, value_range_of
from ..objectives import check_objective, expand_target, same_pass_target


def _layer(be, x, layer):
    return be.default_layer(x.shape[1:]) if layer is None else layer


def _check_4d(name, a):
    if a.ndim != 4:
        raise MultisalError(f"layer {name!r} gives an activation of shape {a.shape}; a CAM needs a 4-D (N,C,H,W) one")


def _finish(A, weights, x_shape, upsample, normalize, filters=None, mask=None):
    """relu(sum_k w_k A_k), or one relu(w_k A_k) per filter; then resize and scale as asked."""
    if mask is not None:
        A = A * mask
    if filters is None:
        cams = np.maximum(np.einsum("nk,nkhw->nhw", weights, A), 0)
    else:
        K = A.shape[1]
        bad = [k for k in filters if not 0 <= k < K]
        if bad:
            raise MultisalError(f"filter {bad[0]} out of range: the layer has {K} feature maps (0..{K - 1})")
        cams = np.maximum(weights[:, filters, None, None] * A[:, filters], 0)
    cams = cams.astype(np.float32)
    if upsample:
        cams = resize_maps(cams, x_shape[2:])
    if normalize:
        cams = scale_01(cams)
    return cams


def _gradcam_pp_weights(A, d1, d2, d3, eps=0.0):
    """Grad-CAM++ channel weights from first, second and third derivatives (or their means).

    eps=0 is the paper's formula (alpha = 0 where the denominator vanishes); pytorch-grad-cam adds
    eps=1e-6 to the denominator, which matters when gradients are small.
    """
    denom = 2 * d2 + A.sum(axis=(2, 3), keepdims=True) * d3 + eps
    safe = np.where(denom != 0, denom, 1)
    alpha = np.where((d1 != 0) & (denom != 0), d2 / safe, 0)
    return (alpha * np.maximum(d1, 0)).sum(axis=(2, 3))


def gradcam(be, x, target=None, layer=None, upsample=True, normalize=True, objective="logit"):
    check_objective(objective)
    layer = _layer(be, x, layer)
    res = be.run(x, objective, same_pass_target(target, len(x)), layers=[layer])
    A, g = res.activations[layer], res.gradients[layer]
    _check_4d(layer, A)
    return _finish(A, g.mean(axis=(2, 3)), x.shape, upsample, normalize)


def gradcam_pp(be, x, target=None, layer=None, upsample=True, normalize=True, objective="logit", eps=0.0):
    check_objective(objective)
    layer = _layer(be, x, layer)
    res = be.run(x, objective, same_pass_target(target, len(x)), layers=[layer])
    A, g = res.activations[layer].astype(np.float64), res.gradients[layer].astype(np.float64)
    _check_4d(layer, A)
    weights = _gradcam_pp_weights(A, g, g ** 2, g ** 3, eps)
    return _finish(A, weights, x.shape, upsample, normalize)


def _neuron_mask(neurons, region, shape):
    """Where the activations are kept: the listed (row, col) points, or with region=True the box
    between the first two points (inclusive)."""
    h, w = shape
    mask = np.zeros((h, w), dtype=np.float64)
    points = [tuple(int(v) for v in p) for p in neurons]
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


def smooth_gradcam_pp(be, x, target=None, layer=None, n=4, noise_level=DEFAULT_NOISE_LEVEL, sigma=None,
                      seed=0, filters=None, neurons=None, region=False, upsample=True, normalize=True,
                      objective="logit", noise="normal", batch_size=None, progress=False, preset=None):
    """n=0 uses the clean input's gradients alone (plain Grad-CAM++)."""
    check_objective(objective)
    x = np.asarray(x, dtype=np.float32)
    layer = _layer(be, x, layer)
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
    _check_4d(layer, A)
    if n == 0:
        g = clean.gradients[layer].astype(np.float64)
        d1, d2, d3 = g, g ** 2, g ** 3
    else:
        if isinstance(noise, str):
            sigma = resolve_sigma(noise_level, sigma, value_range_of(be, preset), x)
        stream = NoiseStream(noise, x, n, sigma or 0.0, seed)
        d1, d2, d3 = (np.zeros(A.shape) for _ in range(3))
        step = int(batch_size) if batch_size else be.batch_size(x.shape[1:])
        for images, noisy in stream.batches(step, progress, desc="smooth_gradcam_pp"):
            chunk_target = target[images] if isinstance(target, np.ndarray) else target
            g = be.run(noisy, objective, chunk_target, layers=[layer]).gradients[layer].astype(np.float64)
            add_per_image(d1, images, g)
            add_per_image(d2, images, g ** 2)
            add_per_image(d3, images, g ** 3)
        d1, d2, d3 = d1 / stream.n, d2 / stream.n, d3 / stream.n
    weights = _gradcam_pp_weights(A, d1, d2, d3)
    mask = None if not neurons else _neuron_mask(neurons, region, A.shape[2:])
    return _finish(A, weights, x.shape, upsample, normalize, filters=filters, mask=mask)
