"""multisal: saliency for PyTorch, ONNX and Chainer models, written once in NumPy.

`import multisal` imports the backend-neutral core only (NumPy): no framework, no OpenCV, Pillow
or tqdm, and none of the application (multisal.app). The application's entry points and the ONNX
backend's tools are public names here too; each is imported the first time it is used.
"""
import importlib

from .backend import Backend, ByteSize, Result
from .errors import MissingFrameworkError, MultisalError
from .evaluation import METRICS, evaluate
from .methods import METHODS
from .layouts import LAYOUTS, Layout
from .methods.ablationcam import ablationcam
from .methods.attention_rollout import attention_rollout
from .methods.class_visualization import class_visualization
from .methods.eigencam import eigencam
from .methods.fooling import fooling_image
from .methods.gradcam import gradcam
from .methods.gradcam_pp import gradcam_pp
from .methods.hirescam import hirescam
from .methods.integrated_gradients import integrated_gradients
from .methods.layercam import layercam
from .methods.occlusion import occlusion
from .methods.rise import rise
from .methods.scorecam import scorecam
from .methods.segment import segment
from .methods.smooth_gradcam_pp import smooth_gradcam_pp
from .methods.smoothgrad import smoothgrad
from .methods.transformer_attribution import transformer_attribution
from .methods.vanilla import vanilla_gradient
from .methods.xgradcam import xgradcam
from .noise import smooth
from .objectives import ARGMAX_PER_SAMPLE, OBJECTIVES, Detections, Region, detections, region
from .pictures import overlay, show
from .presets import Preset, get_preset
from .registry import register_backend

__version__ = "0.1.0"

# Public names that live outside the core, imported on first use: name -> module.
_ELSEWHERE = {
    "load_backend": "multisal.app.loading",
    "load_config": "multisal.app.config",
    "ConfigError": "multisal.app.config",
    "run_explain": "multisal.app.runs",
    "run_batch": "multisal.app.runs",
    "ExplainRun": "multisal.app.runs",
    "Job": "multisal.app.job",
    "tune_malloc": "multisal.app.malloc",
    "export_gradient_graph": "multisal.backends.onnx.backend",
    "check_model": "multisal.backends.onnx.check",
}


def __getattr__(name):
    if name in _ELSEWHERE:
        value = getattr(importlib.import_module(_ELSEWHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'multisal' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_ELSEWHERE))


__all__ = [
    "Backend", "ByteSize", "Result", "register_backend", "load_backend", "export_gradient_graph", "check_model",
    "MultisalError",
    "MissingFrameworkError", "get_preset", "Preset", "region", "Region", "detections", "Detections", "ARGMAX_PER_SAMPLE",
    "load_config",
    "ConfigError", "run_explain", "run_batch", "Job", "ExplainRun", "tune_malloc", "OBJECTIVES", "METHODS",
    "vanilla_gradient", "smoothgrad", "integrated_gradients", "gradcam", "gradcam_pp", "smooth_gradcam_pp",
    "layercam", "xgradcam", "hirescam", "eigencam", "scorecam", "ablationcam", "occlusion", "rise",
    "attention_rollout", "transformer_attribution", "Layout", "LAYOUTS",
    "smooth", "fooling_image", "class_visualization", "segment", "overlay", "show", "evaluate", "METRICS",
]
