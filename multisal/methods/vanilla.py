"""Vanilla gradient saliency (Simonyan et al. 2013): max over colour channels of |d score / d x|."""
from ..maps import check_channel_reduce, reduce_channels
from ..objectives import check_objective, same_pass_target


def vanilla_gradient(be, x, target=None, objective="logit", channel_reduce="max", abs=True):
    """(N,H,W) map (or (N,C,H,W) with channel_reduce=None) of the gradient of the objective."""
    return gradient_map(be, x, same_pass_target(target, len(x)), objective, channel_reduce, abs)


def gradient_map(be, x, target, objective="logit", channel_reduce="max", abs=True, square=False):
    """The per-sample map of the input gradient for a backend target: |g| (or g**2), then the
    channel reduction. SmoothGrad averages it over noisy copies."""
    check_objective(objective)
    check_channel_reduce(channel_reduce)
    grad = be.run(x, objective, target, input_grad=True).input_grad
    return reduce_channels(grad, channel_reduce, abs=abs, square=square)
