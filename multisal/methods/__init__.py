"""The saliency methods, one file each, written against the backend seam (multisal.backend).

METHODS is the one registration of a method that configurations and the command line run by
name: a new method is its file plus its line here.
"""
from .gradcam import gradcam
from .gradcam_pp import gradcam_pp
from .integrated_gradients import integrated_gradients
from .smooth_gradcam_pp import smooth_gradcam_pp
from .smoothgrad import smoothgrad
from .vanilla import vanilla_gradient

METHODS = {
    "vanilla_gradient": vanilla_gradient,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "gradcam": gradcam,
    "gradcam_pp": gradcam_pp,
    "smooth_gradcam_pp": smooth_gradcam_pp,
}
