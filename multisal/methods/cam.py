"""The CAM base: relu(sum_k w_k A_k), at layer resolution or resized to the input and scaled
to [0, 1] per image. The methods differ only in where the weights w come from, each a few lines on
this base: from the layer's gradient (gradcam.py, gradcam_pp.py, smooth_gradcam_pp.py, xgradcam.py;
elementwise, one weight per activation, in layercam.py and hirescam.py), from the activations alone
(eigencam.py) or from forward passes of perturbed inputs (scorecam.py, ablationcam.py).

A layer's activation reaches them as feature maps A (N, K, h, w) whatever its layout: NCHW as it
is, NHWC transposed, tokens (N, T, C) with the prefix tokens dropped and the rest laid on their
grid (multisal.layouts; the `layout`, `prefix_tokens` and `token_grid` keywords override what is
recognised).
"""
import numpy as np

from ..backend import check_input
from ..errors import MultisalError
from ..maps import resize_maps, scale_01
from ..objectives import check_objective, same_pass_target


def cam_layer(be, x, layer):
    """The layer a CAM reads: the one named, or the backend's default for this input size."""
    return be.default_layer(x.shape[1:]) if layer is None else layer


def layer_form(be, x, layer, activation, layout=None, prefix_tokens=None, token_grid=None):
    """The multisal.layouts.Layout of the CAM layer's activation (recognised, or as the overrides
    say): one line naming the layer where it is no grid of feature maps."""
    return be.layer_layout(layer, activation.shape, x.shape[1:], layout, prefix_tokens, token_grid)


def layer_pass(be, x, target, layer, objective, layout=None, prefix_tokens=None, token_grid=None):
    """One pass on the clean input: (A, dObjective/dA) of the CAM's layer for a method's target, as
    feature maps (N, K, h, w)."""
    check_objective(objective)
    x = check_input(x)
    layer = cam_layer(be, x, layer)
    res = be.run(x, objective, same_pass_target(target, len(x)), layers=[layer])
    form = layer_form(be, x, layer, res.activations[layer], layout, prefix_tokens, token_grid)
    return form.to_maps(res.activations[layer]), form.to_maps(res.gradients[layer])


def activation_pass(be, x, layer, layout=None, prefix_tokens=None, token_grid=None):
    """One forward pass on the clean input, no gradient: (the CAM layer's name, its activation as
    feature maps A (N, K, h, w), the outputs, its Layout, the activation as the layer gives it)."""
    x = check_input(x)
    layer = cam_layer(be, x, layer)
    res = be.run(x, layers=[layer])
    native = res.activations[layer]
    form = layer_form(be, x, layer, native, layout, prefix_tokens, token_grid)
    return layer, form.to_maps(native), res.outputs, form, native


def finish(A, weights, x_shape, upsample, normalize, filters=None, mask=None):
    """relu(sum_k w_k A_k), or one relu(w_k A_k) per filter; then resize and scale as asked.
    weights is (N,K), one per feature map, or (N,K,h,w), one per activation (Layer-CAM, HiResCAM)."""
    if mask is not None:
        A = A * mask
    elementwise = weights.ndim == 4
    if filters is None:
        cams = np.maximum(np.einsum("nkhw,nkhw->nhw" if elementwise else "nk,nkhw->nhw", weights, A), 0)
    else:
        K = A.shape[1]
        if len(filters) == 0:
            raise MultisalError("filters=[] selects no feature map: give their indices, or None for the whole CAM")
        bad = [k for k in filters if not 0 <= k < K]
        if bad:
            raise MultisalError(f"filter {bad[0]} out of range: the layer has {K} feature maps (0..{K - 1})")
        per_map = weights[:, filters] if elementwise else weights[:, filters, None, None]
        cams = np.maximum(per_map * A[:, filters], 0)
    cams = cams.astype(np.float32)
    if upsample:
        cams = resize_maps(cams, x_shape[2:])
    if normalize:
        cams = scale_01(cams)
    return cams


def gradcam_pp_weights(A, d1, d2, d3, eps=0.0):
    """Grad-CAM++ channel weights from first, second and third derivatives (or their means).

    eps=0 is the paper's formula (alpha = 0 where the denominator vanishes); pytorch-grad-cam adds
    eps=1e-6 to the denominator, which matters when gradients are small.
    """
    denom = 2 * d2 + A.sum(axis=(2, 3), keepdims=True) * d3 + eps
    safe = np.where(denom != 0, denom, 1)
    alpha = np.where((d1 != 0) & (denom != 0), d2 / safe, 0)
    return (alpha * np.maximum(d1, 0)).sum(axis=(2, 3))
