"""Grad-CAM++ (Chattopadhay et al. 2018): positive gradients weighted by the paper's alpha."""
import numpy as np

from .cam import finish, gradcam_pp_weights, layer_pass


def gradcam_pp(be, x, target=None, layer=None, upsample=True, normalize=True, objective="logit", eps=0.0):
    A, g = (a.astype(np.float64) for a in layer_pass(be, x, target, layer, objective))
    return finish(A, gradcam_pp_weights(A, g, g ** 2, g ** 3, eps), x.shape, upsample, normalize)
