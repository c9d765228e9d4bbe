"""XGrad-CAM (Fu et al. 2020): the gradient averaged over each feature map with the map's own
activations as weights."""
import numpy as np

from .cam import finish, layer_pass


def xgradcam(be, x, target=None, layer=None, upsample=True, normalize=True, objective="logit", eps=0.0, layout=None, prefix_tokens=None,
             token_grid=None):
    r"""XGrad-CAM (Fu et al. 2020): feature maps weighted by their gradient averaged with the activations as weights.

    Fu, Hu, Dong, Ma, Zheng and Qiu 2020, "Axiom-based Grad-CAM: Towards Accurate Visualization
    and Explanation of CNNs". The weights that best satisfy the paper's sensitivity and
    conservation axioms: each feature map's gradient, averaged over positions in proportion to the
    map's activation there. With A (K,h,w) the layer's activation and S the objective of the
    target class:

    .. math::
        w_k = \sum_{i,j} \frac{A_{kij}}{\sum_{a,b} A_{kab} + \epsilon}\,
        \frac{\partial S}{\partial A_{kij}}
        \quad (w_k = 0 \text{ where the denominator is } 0), \qquad
        L = \mathrm{ReLU}\Big(\sum_k w_k A_k\Big)

    computed in float64. L is then resized to the input (bilinear) and scaled to [0, 1] per image.
    One pass on the clean input; nothing below the layer is differentiated.

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
        eps: epsilon added to the denominator (default 0.0, the paper's formula; pytorch-grad-cam
            adds 1e-7 and torch-cam 1e-8, which matters where a feature map is nearly all zeros).
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
        Where global average pooling and one linear layer follow the layer (as in this net), the
        gradient is the same at every position and XGrad-CAM is Grad-CAM:

        >>> cam = ms.xgradcam(be, x, target=0)
        >>> cam.shape, bool(np.allclose(cam, ms.gradcam(be, x, target=0), atol=1e-6))
        ((2, 32, 32), True)
    """
    A, g = (a.astype(np.float64) for a in layer_pass(be, x, target, layer, objective, layout, prefix_tokens, token_grid))
    denom = A.sum(axis=(2, 3)) + eps
    weights = np.where(denom != 0, (A * g).sum(axis=(2, 3)) / np.where(denom != 0, denom, 1), 0)
    return finish(A, weights, x.shape, upsample, normalize)
