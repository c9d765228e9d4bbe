"""Vanilla gradient saliency (Simonyan et al. 2013): max over colour channels of |d score / d x|."""
from ..maps import check_channel_reduce, reduce_channels
from ..objectives import check_objective, same_pass_target


def vanilla_gradient(be, x, target=None, objective="logit", channel_reduce="max", abs=True):
    """(N,H,W) map (or (N,C,H,W) with channel_reduce=None) of the gradient of the objective."""
    check_objective(objective)
    check_channel_reduce(channel_reduce)
    result = be.run(x, objective, same_pass_target(target, len(x)), input_grad=True)
    return reduce_channels(result.input_grad, channel_reduce, abs=abs)
