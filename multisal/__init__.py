"""multisal: gradient saliency for PyTorch, ONNX and Chainer models, written once in NumPy.

`import multisal` imports no framework; a backend imports its own when it is chosen.
"""
from .backend import Backend, Result, load_backend
from .config import ConfigError, load_config
from .errors import MissingFrameworkError, MultisalError
from .batch import ExplainRun, run_batch, run_explain
from .explain import Job
from .malloc import tune_malloc
from .methods.cam import gradcam, gradcam_pp, smooth_gradcam_pp
from .methods.class_visualization import class_visualization
from .methods.fooling import fooling_image
from .methods.integrated_gradients import integrated_gradients
from .methods.segment import segment
from .methods.smoothgrad import smoothgrad
from .methods.vanilla import vanilla_gradient
from .models.presets import Preset, get_preset
from .objectives import OBJECTIVES, Region, region

__version__ = "0.1.0"


def export_gradient_graph(src, dst, layers=(), objective="logit", input_grad=True, input_shape=None, region=False):
    """Differentiate the ONNX model at `src` and write the self-contained gradient graph to `dst`
    (see multisal.backends.onnx_backend.export_gradient_graph). Needs the onnx extra."""
    try:
        from .backends.onnx_backend import export_gradient_graph as export
    except ImportError:
        raise MissingFrameworkError("export_gradient_graph needs onnx and onnxruntime: pip install 'multisal[onnx]'") from None
    return export(src, dst, layers=layers, objective=objective, input_grad=input_grad, input_shape=input_shape,
                  region=region)

# The saliency methods by name, as the command line and configuration files refer to them.
METHODS = {
    "vanilla_gradient": vanilla_gradient,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "gradcam": gradcam,
    "gradcam_pp": gradcam_pp,
    "smooth_gradcam_pp": smooth_gradcam_pp,
}

__all__ = [
    "Backend", "Result", "load_backend", "export_gradient_graph", "MultisalError", "get_preset", "Preset", "region", "Region",
    "load_config", "ConfigError", "run_explain", "run_batch", "Job", "ExplainRun", "tune_malloc",
    "OBJECTIVES", "METHODS", "vanilla_gradient", "smoothgrad", "integrated_gradients", "gradcam",
    "gradcam_pp", "smooth_gradcam_pp", "fooling_image", "class_visualization", "segment",
]
