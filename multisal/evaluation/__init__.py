r"""Measuring which map to trust: ``evaluate(be, x, maps, metrics=[...])`` scores saliency maps
against the model that they explain, in the backend-neutral core (forward passes through the
backend's seam, in batches of its memory budget).

Each metric is one file here: deletion and insertion (causal.py, the RISE paper), ROAD MoRF and
LeRF (road.py, Rong et al. 2022), the sanity checks (sanity.py, Adebayo et al. 2018: cascading
model-parameter randomisation and the random logit), sparseness and complexity (sparsity.py), and
two trivial maps scored by the same metrics (baselines.py: random, Sobel edges).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..backend import check_input
from ..errors import MultisalError
from ..methods import METHODS
from ..objectives import Region, clean_target
from ..progress import progress_bar
from .baselines import BASELINES, random_map, sobel_map
from .causal import causal_curves, deletion, gaussian_blur, insertion
from .common import check_maps, normalized_auc, spearman
from .road import DEFAULT_NOISE, DEFAULT_PERCENTAGES, linear_imputation, road_curves, road_score
from .sanity import model_randomization, off_classes, random_logit
from .sparsity import complexity, sparseness

# metric: whether a higher score is the better one.
HIGHER_IS_BETTER = {
    "deletion": False, "insertion": True, "road_morf": False, "road_lerf": True,
    "randomization": False, "random_logit": False, "sparseness": True, "complexity": False,
}
METRICS = tuple(HIGHER_IS_BETTER)
# The metrics that make a map again (on a randomised model, for another class): they need the
# method that made it, which evaluate() finds by the map's name.
REMAKES_MAPS = frozenset({"randomization", "random_logit"})
# Cascade steps of the randomisation check by default (layers grouped top down): one step per
# layer would make a deep model's maps again hundreds of times.
DEFAULT_RANDOMIZATION_STEPS = 5


def evaluate(be, x, maps, metrics=METRICS, target=None, baselines=False, explain=None, method_options=None,
             step=None, percentages=DEFAULT_PERCENTAGES, noise=DEFAULT_NOISE,
             randomization_steps=DEFAULT_RANDOMIZATION_STEPS, seed=0, batch_size=None, progress=False):
    r"""Score saliency maps with metrics of faithfulness, sanity and concentration.

    Deletion and insertion (Petsiuk et al. 2018): the normalised area under the target's softmax
    probability as the map's pixels are removed (set to 0 in model space) or inserted into a
    blurred copy, a fixed number a step. ROAD (Rong et al. 2022): the mean probability after
    removing the most (MoRF) or least (LeRF) relevant pixels at each percentage, filled in by
    noisy linear imputation. Sanity checks (Adebayo et al. 2018): the mean over the steps of a
    cascading randomisation (top layer down) of Spearman's correlation with the original map,
    and that correlation with the map of a random other class. Sparseness (Gini index) and
    complexity (entropy) of the map's magnitudes:

    .. math::
        \mathrm{AUC} = \tfrac{1}{K}\big(\textstyle\sum_{k=0}^{K} p_k - \tfrac{p_0 + p_K}{2}\big), \quad
        G = \frac{\sum_k (2k - n - 1)\, a_{(k)}}{n \sum_k a_{(k)}}, \quad H = -\sum_i p_i \log p_i

    Args:
        be: the backend (multisal.Backend) that runs the model the maps explain.
        x: inputs (N,C,H,W) float32 in model space.
        maps: {name: (N,H,W) map}, or one (N,H,W) array (named "map"); each at the inputs' size.
            An (N,C,H,W) attribution (Integrated Gradients') is scored as the max over channels of
            its magnitude.
        metrics: names from METRICS (default all): "deletion", "insertion", "road_morf",
            "road_lerf", "randomization", "random_logit", "sparseness", "complexity".
        target: None (default: each image's top class on the clean input), an int or one int per
            image: the class the maps explain.
        baselines: also score a random map and a Sobel edge map of x, named "random" and "sobel"
            (default False).
        explain: {name: (backend, x, target) -> maps} making the map of that name again, for
            "randomization" and "random_logit" (default None: a name of METHODS runs that method
            with method_options[name], a baseline's name that baseline).
        method_options: {method name: keywords} for the methods the sanity checks run
            (default None: their defaults).
        step: pixels per deletion/insertion step (default None: ceil(H W / 224)).
        percentages: ROAD's percentages of pixels removed (default 10, 20, ..., 90).
        noise: ROAD's imputation noise, standard deviation in model space (default 0.01).
        randomization_steps: the cascade's steps, layers grouped top down (default 5; None: one
            layer a step).
        seed: the seed of ROAD's noise, the randomised parameters, the random class and the
            random baseline (default 0).
        batch_size: perturbed inputs per backend call (default None: as many as the backend's
            memory budget holds).
        progress: show progress bars (default False).

    Returns:
        {map name: {metric: float64 (N,) one score per image}}, maps in the order given
        (baselines last), metrics in the order asked for.

    Example:
        >>> scores = ms.evaluate(be, x, {"gradcam": ms.gradcam(be, x)}, metrics=["deletion", "sparseness"])
        >>> sorted(scores["gradcam"]), scores["gradcam"]["deletion"].shape
        (['deletion', 'sparseness'], (2,))
    """
    x = check_input(x)
    metrics = check_metrics(metrics)
    named = _named_maps(maps, x)
    if baselines:
        for name in BASELINES:
            if name in named:
                raise MultisalError(f"map {name!r} is also the name of a baseline: rename it, or give baselines=False")
            named[name] = check_maps(name, _baseline(name, seed)(be, x, None), x)
    remakers = _remakers(named, metrics, explain, method_options or {}, seed)
    if "randomization" in metrics:
        be.check_randomizes()
    if isinstance(target, str) or isinstance(target, Region):
        raise MultisalError(f"evaluate's target must be None, a class index or one per image, got {target!r}: the "
                            "metrics score the probability of one class per image")
    target = clean_target(be, x, target)
    scores = {name: {} for name in named}
    for name in progress_bar(named, desc="evaluate", enabled=progress, unit="map"):
        sal = named[name]
        for metric in metrics:
            if metric in ("deletion", "insertion"):
                value = normalized_auc(causal_curves(be, x, sal, metric, target, step, batch_size, progress, name))
            elif metric in ("road_morf", "road_lerf"):
                value = road_score(be, x, sal, metric[5:], target, percentages, noise, seed, batch_size, progress, name)
            elif metric == "randomization":
                value = model_randomization(be, x, remakers[name], sal, target, randomization_steps, seed, progress,
                                            name)[0].mean(axis=1)
            elif metric == "random_logit":
                value = random_logit(be, x, remakers[name], sal, target, seed, name)
            elif metric == "sparseness":
                value = sparseness(sal)
            else:
                value = complexity(sal)
            scores[name][metric] = np.asarray(value, np.float64)
    return scores


def check_metrics(metrics) -> tuple:
    """The metric names asked for, as a tuple, or one line naming the first unknown one."""
    if isinstance(metrics, str):
        metrics = [metrics]
    metrics = tuple(metrics)
    if not metrics:
        raise MultisalError(f"no metric given: expected names from {', '.join(METRICS)}")
    for metric in metrics:
        if metric not in HIGHER_IS_BETTER:
            raise MultisalError(f"unknown metric {metric!r}: expected one of {', '.join(METRICS)}")
    return tuple(dict.fromkeys(metrics))


def _named_maps(maps, x) -> dict:
    if isinstance(maps, Mapping):
        if not maps:
            raise MultisalError("maps holds no map: give {name: (N,H,W) array}")
        return {str(name): check_maps(name, value, x) for name, value in maps.items()}
    return {"map": check_maps("map", maps, x)}


def _baseline(name, seed):
    if name == "random":
        return lambda be, x, target: random_map(be, x, target, seed)
    return BASELINES[name]


def _remakers(named, metrics, explain, method_options, seed) -> dict:
    """{map name: (backend, x, target) -> maps} for the metrics that make maps again."""
    if not REMAKES_MAPS & set(metrics):
        return {}
    explain = dict(explain or {})
    out = {}
    for name in named:
        if name in explain:
            out[name] = explain[name]
        elif name in METHODS:
            fn, options = METHODS[name], dict(method_options.get(name, {}))
            out[name] = lambda be, x, target, fn=fn, options=options: fn(be, x, target=target, **options)
        elif name in BASELINES:
            out[name] = _baseline(name, seed)
        else:
            raise MultisalError(f"map {name!r}: the sanity checks make the map again and {name!r} is no method "
                                f"(ms.METHODS): give explain={{{name!r}: (backend, x, target) -> maps}}")
    return out


__all__ = ["evaluate", "METRICS", "HIGHER_IS_BETTER", "check_metrics", "deletion", "insertion", "causal_curves",
           "gaussian_blur", "road_score", "road_curves", "linear_imputation", "model_randomization", "random_logit",
           "off_classes", "sparseness", "complexity", "random_map", "sobel_map", "spearman", "BASELINES"]
