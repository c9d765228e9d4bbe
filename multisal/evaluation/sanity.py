r"""Sanity checks (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"): does a map change when
what it claims to explain changes?

Cascading model-parameter randomisation: the model's layers with parameters are randomised one
after another from the top (the output) down, cumulatively, on a copy of the model (the
backend's ``randomized``); after each step the map is made again on the randomised model and
compared with the original map by Spearman's rank correlation :math:`\rho`. A map that explains
the model decorrelates as more of the model is random (low is good); an edge detector stays at 1.

Random logit (Sixt et al. 2020's check, as Quantus's RandomLogit): the map for the target class
against the map for another class drawn at random, by the same rank correlation (low is good).

.. math::
    \rho(a, b) = \frac{\operatorname{cov}(\operatorname{rank} a, \operatorname{rank} b)}
                      {\sigma_{\operatorname{rank} a}\, \sigma_{\operatorname{rank} b}}
"""
from __future__ import annotations

import numpy as np

from ..backend import check_input, even_chunks
from ..errors import MultisalError
from ..objectives import clean_target
from ..progress import progress_bar
from .common import check_count, check_maps, spearman


def cascade_steps(be, steps=None) -> list:
    """The layers randomised after each step of the cascade, top down: with steps None one layer
    a step (every layer with parameters); with an integer k, the layers top down in k groups of
    sizes differing by at most one. Returns [[layer, ...] cumulative per step]."""
    layers = list(reversed(be.parameter_layers()))
    if not layers:
        raise MultisalError(f"{be.describe()} has no layer with parameters to randomise")
    if steps is None:
        groups = [[name] for name in layers]
    else:
        steps = check_count("randomization_steps", steps, 1, len(layers))
        groups = [layers[a:b] for a, b in even_chunks(len(layers), -(-len(layers) // steps))]
    return [sum(groups[:k + 1], []) for k in range(len(groups))]


def model_randomization(be, x, explain, original, target=None, steps=None, seed=0, progress=False, name="map"):
    """Spearman's correlation of each image's `original` map (N, H, W) with the map `explain`
    makes after each step of the cascading randomisation: float64 (N, steps), and the name of the
    last layer randomised at each step.

    explain: (backend, x, target) -> maps (N, H, W), the method that made `original`.
    target: None (each image's top class on the clean input of the original model), an int or
        one int per image; the randomised models explain the same class.
    steps: see cascade_steps (default None: one step per layer).
    seed: the seed of the randomised parameters (the backend's ``randomized``).
    """
    x = check_input(x)
    original = check_maps(name, original, x)
    be.check_randomizes()
    target = clean_target(be, x, target)
    cascade = cascade_steps(be, steps)
    scores = np.zeros((len(x), len(cascade)))
    for k, layers in enumerate(progress_bar(cascade, desc=f"randomization {name}", enabled=progress, unit="step")):
        again = check_maps(name, explain(be.randomized(layers, seed=seed), x, target), x)
        scores[:, k] = spearman(original, again)
    return scores, [layers[-1] for layers in cascade]


def off_classes(target, n_classes, seed=0) -> np.ndarray:
    """For each image a class other than its target, drawn as Quantus's RandomLogit draws it:
    numpy.random.seed(seed), then randint(0, n_classes - 1) per image indexes the classes left
    when the target is taken out."""
    target = np.asarray(target, np.int64)
    if n_classes < 2:
        raise MultisalError("the random-logit check needs a model with at least 2 classes")
    index = np.random.RandomState(seed).randint(0, n_classes - 1, len(target))
    return index + (index >= target)


def random_logit(be, x, explain, original, target=None, seed=0, name="map"):
    """Spearman's correlation of each image's `original` map with the map `explain` makes for a
    random other class (off_classes): float64 (N,).

    explain: (backend, x, target) -> maps (N, H, W), the method that made `original`.
    target: None (each image's top class on the clean input), an int or one int per image.
    """
    x = check_input(x)
    original = check_maps(name, original, x)
    outputs = be.predict(x)
    target = clean_target(be, x, target)
    other = off_classes(target, outputs.shape[1], seed)
    return spearman(original, check_maps(name, explain(be, x, other), x))
