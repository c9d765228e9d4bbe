"""Score-CAM (Wang et al. 2020): feature maps weighted by how much the target's score rises on the
input masked by each of them, upsampled and scaled to [0, 1]."""
import numpy as np

from ..backend import check_input, samples_per_call
from ..maps import resize_maps, scale_01
from ..objectives import check_objective, objective_from_scores, target_rows
from .cam import activation_pass, finish
from .perturb import all_perturbed_scores, clean_pass_target


def scorecam(be, x, target=None, layer=None, batch_size=None, upsample=True, normalize=True, objective="softmax",
             channel_softmax=True, progress=False, layout=None, prefix_tokens=None,
             token_grid=None):
    r"""Score-CAM (Wang et al. 2020): feature maps weighted by the target's score on the input each of them masks.

    Wang, Wang, Du, Yang, Zhang, Ding, Mardziel and Hu 2020, "Score-CAM: Score-Weighted Visual
    Explanations for Convolutional Neural Networks", Algorithm 1. Each feature map of A (K,h,w),
    resized to the input (bilinear, Up) and scaled to [0, 1] (s; a constant map is 0), masks the
    input; its weight is the rise of the target's objective S over the baseline :math:`x_b = 0`
    (the input with everything masked out), normalised by a softmax over the feature maps:

    .. math::
        H_k = s\big(\mathrm{Up}(A_k)\big), \qquad
        C_k = S(x \odot H_k) - S(x_b), \qquad
        \alpha_k = \frac{e^{C_k}}{\sum_{k'} e^{C_{k'}}}, \qquad
        L = \mathrm{ReLU}\Big(\sum_k \alpha_k A_k\Big)

    The paper's S is the class probability (section 3.3, "post-softmax"), hence
    ``objective="softmax"``; pytorch-grad-cam and torch-cam use the logit (``objective="logit"``
    reproduces them). The softmax does not change with :math:`S(x_b)`, which is then not computed;
    ``channel_softmax=False`` takes the weights :math:`\alpha_k = C_k` themselves (the paper's
    "channel-wise increase of confidence"). L is resized to the input (bilinear) and scaled to
    [0, 1] per image. Forward passes only (K per image, no gradient), so it runs on any model the
    backend runs.

    Args:
        be: the backend (multisal.Backend) that runs the model.
        x: inputs (N,C,H,W) float32 in model space.
        target: None (default) for each image's top class on the clean input; an int or one int
            per image; ``"argmax_per_sample"`` (every masked copy picks its own top class); or
            ``ms.region(...)``.
        layer: the name of a layer whose activation is feature maps (NCHW, NHWC or tokens); None
            (default) for the backend's choice (``multisal layers`` marks it): the last feature maps
            that feed the output, or in a vision transformer the input of its last block's first norm.
        batch_size: masked inputs per backend call (default None: as many as the backend's memory
            budget holds for this input shape).
        upsample: resize L to the input's H,W (default True); False keeps the layer's h,w.
        normalize: scale each map to [0, 1] by its minimum and maximum (default True).
        objective: the scalar S of each masked input (``"softmax"`` by default, the paper's; see
            multisal.objectives).
        channel_softmax: normalise the weights by a softmax over the feature maps (default True,
            the paper's Algorithm 1); False weights each map by :math:`C_k` itself.
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
        >>> cam = ms.scorecam(be, x)
        >>> cam.shape, float(cam.min()), float(cam.max())
        ((2, 32, 32), 0.0, 1.0)
    """
    check_objective(objective)
    x = check_input(x)
    _, A, clean, *_ = activation_pass(be, x, layer, layout, prefix_tokens, token_grid)
    target = clean_pass_target(target, clean)
    n_images, n_maps = A.shape[:2]

    def make(start, stop):
        images, maps = np.divmod(np.arange(start, stop), n_maps)
        masks = scale_01(resize_maps(A[images, maps], x.shape[2:]))
        return images, x[images] * masks[:, None], None

    masked = all_perturbed_scores(be, n_images * n_maps, make, objective, target, samples_per_call(be, batch_size, x.shape[1:]),
                                  progress, "scorecam").reshape(n_images, n_maps)
    if channel_softmax:
        weights = np.exp(masked - masked.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
    else:
        blank = be.run(np.zeros_like(x)).outputs
        weights = masked - objective_from_scores(blank, objective, target_rows(target, np.arange(n_images)))[:, None]
    return finish(A.astype(np.float64), weights, x.shape, upsample, normalize)
