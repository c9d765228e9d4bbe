"""Vanilla gradient saliency (Simonyan et al. 2013): max over colour channels of |d score / d x|."""
from ..maps import check_channel_reduce, reduce_channels
from ..objectives import check_objective, same_pass_target


def vanilla_gradient(be, x, target=None, objective="logit", channel_reduce="max", abs=True):
    r"""Vanilla gradient (Simonyan et al. 2013): the largest |d objective / d x| over colour channels, per pixel.

    Simonyan, Vedaldi and Zisserman 2013, "Deep Inside Convolutional Networks: Visualising Image
    Classification Models and Saliency Maps", section 3. With S the objective of the target class
    and x the input (model space), the map of each image is

    .. math::
        M_{ij} = \max_c \left| \frac{\partial S}{\partial x_{cij}} \right|

    (``channel_reduce="mean"`` takes the mean over c instead of the maximum). One forward and one
    backward pass for the whole batch.

    Args:
        be: the backend (multisal.Backend) that runs the model.
        x: inputs (N,C,H,W) float32 in model space (a preset's ``apply()``).
        target: None (default) for each image's top class in this same pass, an int or one int per
            image, ``"argmax_per_sample"``, or ``ms.region(...)`` for a dense output.
        objective: the scalar S differentiated: ``"logit"`` (default), ``"softmax"``,
            ``"log_softmax"`` or ``"chainer_prob_ce"``.
        channel_reduce: how colour channels combine: ``"max"`` (default, the paper's), ``"mean"``,
            or None to keep them.
        abs: take :math:`|\partial S / \partial x|` before reducing (default True); False keeps
            the gradient's sign.

    Returns:
        float32 (N,H,W) maps, >= 0 with ``abs=True`` (not scaled); (N,C,H,W) with
        ``channel_reduce=None``.

    Example:
        >>> m = ms.vanilla_gradient(be, x)
        >>> m.shape, bool(m.min() >= 0)
        ((2, 32, 32), True)
    """
    return gradient_map(be, x, same_pass_target(target, len(x)), objective, channel_reduce, abs)


def gradient_map(be, x, target, objective="logit", channel_reduce="max", abs=True, square=False):
    """The per-sample map of the input gradient for a backend target: |g| (or g**2), then the
    channel reduction. SmoothGrad averages it over noisy copies."""
    check_objective(objective)
    check_channel_reduce(channel_reduce)
    grad = be.run(x, objective, target, input_grad=True).input_grad
    return reduce_channels(grad, channel_reduce, abs=abs, square=square)
