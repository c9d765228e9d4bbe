"""The saliency methods, one file each, written against the backend seam (multisal.backend).

METHODS is the one registration of a method that configurations and the command line run by
name: a new method is its file plus its line here (and, if it runs forward passes only, its name
in FORWARD_ONLY).
"""
from .ablationcam import ablationcam
from .attention_rollout import attention_rollout
from .eigencam import eigencam
from .gradcam import gradcam
from .gradcam_pp import gradcam_pp
from .hirescam import hirescam
from .integrated_gradients import integrated_gradients
from .layercam import layercam
from .occlusion import occlusion
from .rise import rise
from .scorecam import scorecam
from .smooth_gradcam_pp import smooth_gradcam_pp
from .smoothgrad import smoothgrad
from .transformer_attribution import transformer_attribution
from .vanilla import vanilla_gradient
from .xgradcam import xgradcam

METHODS = {
    "vanilla_gradient": vanilla_gradient,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "gradcam": gradcam,
    "gradcam_pp": gradcam_pp,
    "smooth_gradcam_pp": smooth_gradcam_pp,
    "layercam": layercam,
    "xgradcam": xgradcam,
    "hirescam": hirescam,
    "eigencam": eigencam,
    "attention_rollout": attention_rollout,
    "transformer_attribution": transformer_attribution,
    "scorecam": scorecam,
    "ablationcam": ablationcam,
    "occlusion": occlusion,
    "rise": rise,
}

# The methods that run forward passes only (no gradient of any kind): they work on every model
# the backend runs, an ONNX model with an op that has no gradient rule included.
FORWARD_ONLY = frozenset({"eigencam", "attention_rollout", "scorecam", "ablationcam", "occlusion", "rise"})

# The methods that read a vision transformer's attention probabilities, which a CNN has not.
ATTENTION_METHODS = frozenset({"attention_rollout", "transformer_attribution"})

# Methods whose perturbations cost hundreds to thousands of forward passes per image, and the
# attention methods: a run explains them only when its configuration names them; DEFAULT_METHODS
# is every other one.
ON_REQUEST = frozenset({"scorecam", "ablationcam", "occlusion", "rise"}) | ATTENTION_METHODS
DEFAULT_METHODS = tuple(name for name in METHODS if name not in ON_REQUEST)

# The methods whose maps are per-pixel gradients (multisal.pictures clips them at a percentile);
# every other method's map is a coarse heat map already scaled to [0, 1].
PIXEL_MAPS = frozenset({"vanilla_gradient", "smoothgrad", "integrated_gradients"})
