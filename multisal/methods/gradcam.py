"""Grad-CAM (Selvaraju et al. 2017): channel weights are the spatial means of the gradient."""
from .cam import finish, layer_pass


def gradcam(be, x, target=None, layer=None, upsample=True, normalize=True, objective="logit"):
    A, g = layer_pass(be, x, target, layer, objective)
    return finish(A, g.mean(axis=(2, 3)), x.shape, upsample, normalize)
