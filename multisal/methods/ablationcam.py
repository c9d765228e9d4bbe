"""Ablation-CAM (Desai and Ramaswamy 2020): feature maps weighted by the relative drop of the
target's score when each of them is zeroed at the layer."""
import numpy as np

from ..backend import check_input, samples_per_call
from ..errors import MultisalError
from ..objectives import check_objective, objective_from_scores
from .cam import activation_pass, finish
from .perturb import all_perturbed_scores, clean_pass_target


def ablationcam(be, x, target=None, layer=None, batch_size=None, upsample=True, normalize=True,
                objective="logit", progress=False, layout=None, prefix_tokens=None,
                token_grid=None):
    r"""Ablation-CAM (Desai et al. 2020): feature maps weighted by the relative drop of the score without each of them.

    Desai and Ramaswamy 2020, "Ablation-CAM: Visual Explanations for Deep Convolutional Network
    via Gradient-free Localization". With A (K,h,w) the layer's activation, S the objective of the
    target class on the clean input and :math:`S^{(k)}` the objective when feature map k is set to
    zero at the layer (the rest of the model unchanged):

    .. math::
        w_k = \frac{S - S^{(k)}}{S}, \qquad L = \mathrm{ReLU}\Big(\sum_k w_k A_k\Big)

    L is then resized to the input (bilinear) and scaled to [0, 1] per image. Forward passes only
    (one per feature map and image, no gradient), each with the layer's output replaced
    (``Backend.run(..., replace=...)``), so it runs on any model whose backend can replace a
    layer's output, also where an op has no gradient rule.

    Args:
        be: the backend (multisal.Backend) that runs the model.
        x: inputs (N,C,H,W) float32 in model space.
        target: None (default) for each image's top class on the clean input; an int or one int
            per image; ``"argmax_per_sample"`` (every ablated pass picks its own top class); or
            ``ms.region(...)``.
        layer: the name of a layer whose activation is feature maps (NCHW, NHWC or tokens); None
            (default) for the backend's choice (``multisal layers`` marks it): the last feature maps
            that feed the output, or in a vision transformer the input of its last block's first norm.
        batch_size: ablated passes per backend call (default None: as many as the backend's
            memory budget holds for this input shape).
        upsample: resize L to the input's H,W (default True); False keeps the layer's h,w.
        normalize: scale each map to [0, 1] by its minimum and maximum (default True).
        objective: the scalar S compared (``"logit"`` by default, the paper's class score; see
            multisal.objectives).
        progress: show a progress bar (default False).
        layout: how the layer's activation reads as feature maps: None (default) as recognised
            (``multisal layers MODEL`` shows it), ``"nchw"``, ``"nhwc"`` or ``"tokens"`` (N,T,C).
        prefix_tokens: for tokens, how many leading class, distillation or register tokens to drop
            (default None: recognised).
        token_grid: for tokens, the (rows, columns) of the remaining ones (default None: from the
            input's aspect ratio).

    Returns:
        float32 (N,H,W) maps in [0, 1]; (N,h,w) with ``upsample=False``; >= 0 and unscaled with
        ``normalize=False``.

    Example:
        >>> cam = ms.ablationcam(be, x, target=0)
        >>> cam.shape, float(cam.min()), float(cam.max())
        ((2, 32, 32), 0.0, 1.0)
    """
    check_objective(objective)
    be.check_replaces_layers()       # before any pass, not after the clean one
    x = check_input(x)
    layer, A, clean, form, native = activation_pass(be, x, layer, layout, prefix_tokens, token_grid)
    target = clean_pass_target(target, clean)
    score = objective_from_scores(clean, objective, target)
    if (score == 0).any():
        raise MultisalError(f"the target's {objective} is 0 on image {int(np.flatnonzero(score == 0)[0])}: "
                            "Ablation-CAM divides by it")
    n_images, n_maps = A.shape[:2]

    def make(start, stop):
        images, maps = np.divmod(np.arange(start, stop), n_maps)
        ablated = A[images]
        ablated[np.arange(len(images)), maps] = 0
        return images, x[images], {layer: form.from_maps(ablated, native[images])}

    ablated = all_perturbed_scores(be, n_images * n_maps, make, objective, target, samples_per_call(be, batch_size, x.shape[1:]),
                                   progress, "ablationcam").reshape(n_images, n_maps)
    weights = (score[:, None] - ablated) / score[:, None]
    return finish(A.astype(np.float64), weights, x.shape, upsample, normalize)
