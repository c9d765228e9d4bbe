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
    r"""Fooling images (Szegedy et al. 2014): normalised gradient ascent on a class until the model predicts it.

    Szegedy, Zaremba, Sutskever, Bruna, Erhan, Goodfellow and Fergus 2014, "Intriguing properties
    of neural networks", in the recipe of Stanford's CS231n (assignment 3, "Fooling images"). Each
    image x (model space) climbs the logit :math:`S_y` of its target class y with steps of L2 norm
    ``lr``, and stops as soon as the model predicts y:

    .. math::
        x_{t+1} = x_t + \mathrm{lr}\, \frac{g_t}{\lVert g_t \rVert_2}, \qquad
        g_t = \frac{\partial S_y}{\partial x}(x_t), \qquad
        \text{until } \arg\max f(x_t) = y \text{ or } t = \text{max\_iter}

    The images are not clipped to the valid pixel range. Every pass both checks the prediction
    and gives the next gradient.

    Args:
        be: the backend (multisal.Backend) that runs the model (a classifier).
        x: inputs (N,C,H,W) float32 in model space.
        target: the class to reach: an int for every image, or one int per image.
        lr: the L2 length of each step in model space (default 1.0).
        max_iter: the most steps an image takes (default 100).

    Returns:
        (x_fooling, steps): float32 (N,C,H,W) images, and int64 (N,) steps each image took (0 for
        an image already predicted as its target; ``max_iter`` for one not fooled in time).

    Example:
        >>> fooled, steps = ms.fooling_image(be, x, target=1)
        >>> be.predict(fooled).argmax(axis=1), bool((steps <= 100).all())
        (array([1, 1]), True)
    """
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
