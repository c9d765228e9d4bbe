"""Grad-CAM++ (Chattopadhay et al. 2018): positive gradients weighted by the paper's alpha."""
import numpy as np

from .cam import finish, gradcam_pp_weights, layer_pass


def gradcam_pp(be, x, target=None, layer=None, upsample=True, normalize=True, objective="logit", eps=0.0, layout=None, prefix_tokens=None,
               token_grid=None):
    r"""Grad-CAM++ (Chattopadhay et al. 2018): feature maps weighted by alpha-weighted positive gradients.

    Chattopadhay, Sarkar, Howlader and Balasubramanian 2018, "Grad-CAM++: Generalized
    Gradient-based Visual Explanations for Deep Convolutional Networks". With A (K,h,w) the
    layer's activation and :math:`g_{kij} = \partial S / \partial A_{kij}` the gradient of the
    target's objective (the paper's closed form, for the exponential of the score, in which the
    second and third derivatives are powers of g):

    .. math::
        \alpha_{kij} = \frac{g_{kij}^2}{2 g_{kij}^2 + \sum_{a,b} A_{kab}\, g_{kij}^3 + \epsilon}
        \quad (\alpha_{kij} = 0 \text{ where } g_{kij} = 0), \qquad
        w_k = \sum_{i,j} \alpha_{kij}\, \mathrm{ReLU}(g_{kij}), \qquad
        L = \mathrm{ReLU}\Big(\sum_k w_k A_k\Big)

    computed in float64; alpha is also 0 where the denominator vanishes. L is then resized to the
    input (bilinear) and scaled to [0, 1] per image.

    Args:
        be: the backend (multisal.Backend) that runs the model.
        x: inputs (N,C,H,W) float32 in model space.
        target: None (default) for each image's top class in this same pass, an int or one int per
            image, ``"argmax_per_sample"``, or ``ms.region(...)``.
        layer: the name of a layer whose activation is feature maps (NCHW, NHWC or tokens); None
            (default) for the backend's choice (``multisal layers`` marks it): the last feature maps
            that feed the output, or in a vision transformer the input of its last block's first norm.
        upsample: resize L to the input's H,W (default True); False keeps the layer's h,w.
        normalize: scale each map to [0, 1] by its minimum and maximum (default True).
        objective: the scalar S differentiated (``"logit"`` by default; see multisal.objectives).
        eps: epsilon added to alpha's denominator (default 0.0, the paper's formula;
            pytorch-grad-cam uses 1e-6, which matters where gradients are small).
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
        >>> cam = ms.gradcam_pp(be, x)
        >>> cam.shape, float(cam.min()), float(cam.max())
        ((2, 32, 32), 0.0, 1.0)
    """
    A, g = (a.astype(np.float64) for a in layer_pass(be, x, target, layer, objective, layout, prefix_tokens, token_grid))
    return finish(A, gradcam_pp_weights(A, g, g ** 2, g ** 3, eps), x.shape, upsample, normalize)
