"""Grad-CAM (Selvaraju et al. 2017): channel weights are the spatial means of the gradient."""
from .cam import finish, layer_pass


def gradcam(be, x, target=None, layer=None, upsample=True, normalize=True, objective="logit", layout=None, prefix_tokens=None,
            token_grid=None):
    r"""Grad-CAM (Selvaraju et al. 2017): a layer's feature maps weighted by their mean gradient.

    Selvaraju, Cogswell, Das, Vedantam, Parikh and Batra 2017, "Grad-CAM: Visual Explanations from
    Deep Networks via Gradient-based Localization". With A (K,h,w) the layer's activation and
    S the objective of the target class, over the h*w = Z positions of each feature map:

    .. math::
        w_k = \frac{1}{Z} \sum_{i,j} \frac{\partial S}{\partial A_{kij}}, \qquad
        L = \mathrm{ReLU}\Big(\sum_k w_k A_k\Big)

    L is then resized to the input (bilinear) and scaled to [0, 1] per image, in that order. One
    pass on the clean input; nothing below the layer is differentiated.

    Args:
        be: the backend (multisal.Backend) that runs the model.
        x: inputs (N,C,H,W) float32 in model space.
        target: None (default) for each image's top class in this same pass, an int or one int per
            image, ``"argmax_per_sample"``, or ``ms.region(...)``.
        layer: the name of a layer whose activation is feature maps (NCHW, NHWC or tokens); None
            (default) for the backend's choice: the last feature maps
            that feed the output, or in a vision transformer the input of its last block's first norm
            (``multisal layers MODEL`` lists the candidates).
        upsample: resize L to the input's H,W (default True); False keeps the layer's h,w.
        normalize: scale each map to [0, 1] by its minimum and maximum (default True; a constant
            map becomes zeros).
        objective: the scalar S differentiated (``"logit"`` by default; see multisal.objectives).
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
        >>> ms.gradcam(be, x).shape, ms.gradcam(be, x, upsample=False).shape
        ((2, 32, 32), (2, 8, 8))
    """
    A, g = layer_pass(be, x, target, layer, objective, layout, prefix_tokens, token_grid)
    return finish(A, g.mean(axis=(2, 3)), x.shape, upsample, normalize)
