"""Fooling images (cs231n): gradient ascent on the target class score until the model predicts it.

Each step moves x by lr * g / ||g||_2, g the gradient of the target's logit; an image stops as soon
as the model predicts the target. Every pass both checks the prediction and gives the next gradient.
"""
import numpy as np

from ..backend import check_input
from ..errors import MultisalError
from ..objectives import expand_target


# More gradient steps than this is a typo.
MAX_STEPS = 100_000


def fooling_image(be, x, target, lr=1.0, max_iter=100):
    """-> (x_fooling (N,C,H,W), steps_taken (N,) int: the updates each image needed)."""
    x = check_input(x).copy()
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or not 0 <= max_iter <= MAX_STEPS:
        raise MultisalError(f"max_iter={max_iter!r} must be an integer 0..{MAX_STEPS}")
    target = expand_target(target, len(x))
    if not isinstance(target, np.ndarray):
        raise MultisalError("fooling_image needs a class index per image as target")
    steps = np.zeros(len(x), dtype=np.int64)
    active = np.arange(len(x))
    for i in range(int(max_iter) + 1):
        res = be.run(x[active], "logit", target[active], input_grad=i < max_iter)
        fooled = res.outputs.argmax(axis=1) == target[active]
        keep = ~fooled
        if i == max_iter or not keep.any():
            break
        g = res.input_grad[keep]
        norms = np.sqrt((g.astype(np.float64) ** 2).sum(axis=(1, 2, 3)))[:, None, None, None]
        active = active[keep]
        x[active] += (lr * g / np.where(norms > 0, norms, 1)).astype(np.float32)
        steps[active] += 1
    return x, steps
