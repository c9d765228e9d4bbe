"""HiResCAM (Draelos and Carin 2020): the gradient times the activation, elementwise, summed over
feature maps."""
from .cam import finish, layer_pass


def hirescam(be, x, target=None, layer=None, upsample=True, normalize=True, objective="logit", layout=None, prefix_tokens=None,
             token_grid=None):
    r"""HiResCAM (Draelos et al. 2020): the gradient times the activation, elementwise, summed over feature maps.

    Draelos and Carin 2020, "Use HiResCAM instead of Grad-CAM for faithful explanations of
    convolutional neural networks". Grad-CAM averages each feature map's gradient before
    multiplying; HiResCAM multiplies position by position, so that where the layer is followed by
    global average pooling and one linear layer, the map sums (up to the pooling's 1/(hw)) to the
    score the layer's activations contribute. With A (K,h,w) the layer's activation and S the
    objective of the target class:

    .. math::
        L_{ij} = \mathrm{ReLU}\Big(\sum_k \frac{\partial S}{\partial A_{kij}}\, A_{kij}\Big)

    L is then resized to the input (bilinear) and scaled to [0, 1] per image. One pass on the clean
    input; nothing below the layer is differentiated.

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
        gradient is the same at every position and HiResCAM is Grad-CAM (the paper's section 4):

        >>> cam = ms.hirescam(be, x, target=0, upsample=False)
        >>> cam.shape, bool(np.allclose(cam, ms.gradcam(be, x, target=0, upsample=False), atol=1e-6))
        ((2, 8, 8), True)
    """
    A, g = layer_pass(be, x, target, layer, objective, layout, prefix_tokens, token_grid)
    return finish(A, g, x.shape, upsample, normalize)
