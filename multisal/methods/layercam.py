"""Layer-CAM (Jiang et al. 2021): every activation weighted by its own positive gradient."""
import numpy as np

from .cam import finish, layer_pass


def layercam(be, x, target=None, layer=None, upsample=True, normalize=True, objective="logit", layout=None, prefix_tokens=None,
             token_grid=None):
    r"""Layer-CAM (Jiang et al. 2021): each activation weighted by its own positive gradient, summed over feature maps.

    Jiang, Zhang, Hou, Cheng and Wei 2021, "LayerCAM: Exploring Hierarchical Class Activation
    Maps for Localization". Where Grad-CAM gives a feature map one weight, Layer-CAM gives every
    position its own, the positive part of the gradient there, so a shallow layer's map keeps its
    fine detail. With A (K,h,w) the layer's activation and S the objective of the target class:

    .. math::
        w_{kij} = \mathrm{ReLU}\Big(\frac{\partial S}{\partial A_{kij}}\Big), \qquad
        L_{ij} = \mathrm{ReLU}\Big(\sum_k w_{kij}\, A_{kij}\Big)

    L is then resized to the input (bilinear) and scaled to [0, 1] per image (the paper's tanh
    rescaling of shallow layers' maps, for fusing several layers, is not applied). One pass on the
    clean input; nothing below the layer is differentiated.

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
        >>> cam = ms.layercam(be, x)
        >>> cam.shape, float(cam.min()), float(cam.max())
        ((2, 32, 32), 0.0, 1.0)
    """
    A, g = layer_pass(be, x, target, layer, objective, layout, prefix_tokens, token_grid)
    return finish(A, np.maximum(g, 0), x.shape, upsample, normalize)
