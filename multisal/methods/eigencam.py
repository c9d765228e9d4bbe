"""Eigen-CAM (Muhammad and Yeasin 2020): the activations projected on their first principal
direction; no gradient and no class."""
import numpy as np

from .cam import activation_pass, finish


def eigencam(be, x, target=None, layer=None, upsample=True, normalize=True, center=False, layout=None, prefix_tokens=None,
             token_grid=None):
    r"""Eigen-CAM (Muhammad et al. 2020): the layer's activations projected on their first principal direction.

    Muhammad and Yeasin 2020, "Eigen-CAM: Class Activation Map using Principal Components". The
    layer's activation, one row per position and one column per feature map, is factorised
    :math:`O = U \Sigma V^\top`, and the map is its projection on the first right-singular vector:

    .. math::
        O \in \mathbb{R}^{hw \times K},\quad O_{(ij),k} = A_{kij}, \qquad
        L = \mathrm{ReLU}(O\, v_1) = \mathrm{ReLU}\Big(\sum_k v_{1k} A_k\Big), \qquad
        \sum_k v_{1k} \ge 0

    A singular vector's sign is arbitrary; it is taken so that its entries sum to >= 0, the
    direction in which the activations grow (for the non-negative activations after a ReLU the
    projection is then >= 0 everywhere). ``center=True`` subtracts each feature map's mean over
    positions from O first, as pytorch-grad-cam does (it keeps whatever sign its SVD returns; here
    the rule above orients v in both cases). Computed in float64; L is then resized to the input
    (bilinear) and scaled to [0, 1] per image. One forward pass, no gradient: the map is the same
    for every class.

    Args:
        be: the backend (multisal.Backend) that runs the model.
        x: inputs (N,C,H,W) float32 in model space.
        target: not used (default None): Eigen-CAM is class-agnostic; it is accepted so that
            every method is called alike.
        layer: the name of a layer whose activation is feature maps (NCHW, NHWC or tokens); None
            (default) for the backend's choice (``multisal layers`` marks it): the last feature maps
            that feed the output, or in a vision transformer the input of its last block's first norm.
        upsample: resize L to the input's H,W (default True); False keeps the layer's h,w.
        normalize: scale each map to [0, 1] by its minimum and maximum (default True).
        center: subtract each feature map's spatial mean before the factorisation (default
            False, the paper's; True is pytorch-grad-cam's EigenCAM).
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
        >>> cam = ms.eigencam(be, x)
        >>> cam.shape, bool(np.allclose(cam, ms.eigencam(be, x, target=3)))
        ((2, 32, 32), True)
    """
    _, A, *_ = activation_pass(be, x, layer, layout, prefix_tokens, token_grid)
    n, k, h, w = A.shape
    O = A.astype(np.float64).reshape(n, k, h * w).transpose(0, 2, 1)    # (N, positions, feature maps)
    if center:
        O = O - O.mean(axis=1, keepdims=True)
    v = np.linalg.svd(O, full_matrices=False)[2][:, 0, :]                # first right-singular vectors (N, K)
    v = np.where(v.sum(axis=1, keepdims=True) < 0, -v, v)
    return finish(O.transpose(0, 2, 1).reshape(n, k, h, w), v, x.shape, upsample, normalize)
