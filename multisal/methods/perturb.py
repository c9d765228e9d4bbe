"""What the gradient-free methods share: the target's objective read off forward passes of
perturbed inputs (occluded, masked, with a feature map removed), made a batch at a time so that
neither the backend's memory budget nor the method's own arrays grow with the number of
perturbations. A forward pass builds and runs no gradient graph on any backend, so these methods
work on every model the backend can run, also where an op has no gradient rule.
"""
import numpy as np

from ..backend import even_chunks
from ..objectives import expand_target, objective_from_scores, target_rows
from ..progress import progress_bar


def perturbed_scores(be, total, make, objective, target, step, progress=False, desc="perturbations"):
    """Yield (start, stop, scores) over `total` perturbed inputs in chunks of at most `step`:
    make(start, stop) returns (the image each row comes from, the inputs, a replace= mapping or
    None), and scores are the objective of each row's output for its image's target (float64)."""
    for start, stop in progress_bar(even_chunks(total, step), desc=desc, enabled=progress, unit="batch"):
        images, inputs, replace = make(start, stop)
        outputs = be.run(inputs, replace=replace).outputs
        yield start, stop, objective_from_scores(outputs, objective, target_rows(target, images))


def all_perturbed_scores(be, total, make, objective, target, step, progress=False, desc="perturbations"):
    """The scores perturbed_scores yields, as one array (total,) in row order."""
    return np.concatenate([scores for _, _, scores in perturbed_scores(be, total, make, objective, target, step,
                                                                        progress, desc)])


def clean_pass_target(target, outputs):
    """The backend target of a method whose forward pass on the clean inputs gave `outputs`: a
    target of None is that pass's argmax."""
    t = expand_target(target, len(outputs))
    return outputs.argmax(axis=1).astype(np.int64) if t is None else t
