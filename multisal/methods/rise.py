"""RISE (Petsiuk et al. 2018): the mean of random smooth masks, each weighted by the target's score
on the input it masks. The masks are the paper's released code's (a coarse random binary grid,
upsampled bilinearly and cropped at a random shift), drawn from `seed`: `rise_masks` returns them."""
import numpy as np

from ..backend import check_input, samples_per_call
from ..errors import MultisalError
from ..maps import scale_01
from ..objectives import check_objective, clean_target
from .perturb import perturbed_scores

# More masks than this is a typo (each is one forward pass per image).
MAX_MASKS = 100_000


def rise(be, x, target=None, n_masks=4000, grid=7, p=0.5, seed=0, batch_size=None, objective="softmax",
         normalize=True, progress=False):
    r"""RISE (Petsiuk et al. 2018): random masks averaged with the target's score on each masked input as weights.

    Petsiuk, Das and Saenko 2018, "RISE: Randomized Input Sampling for Explanation of Black-box
    Models". N masks are drawn as in the paper's released code: a ``grid`` x ``grid`` binary grid
    whose cells are 1 with probability p, upsampled bilinearly to (grid + 1) cells of
    :math:`\lceil H / \text{grid} \rceil` x :math:`\lceil W / \text{grid} \rceil` pixels and cropped to
    H x W at a random shift of less than one cell (``multisal.methods.rise.rise_masks`` returns
    them). With S the objective of the target class, the map is the score-weighted sum of the masks:

    .. math::
        L_{ij} = \frac{1}{N\, p} \sum_{n=1}^{N} S(x \odot M_n)\, M_{n,ij}

    where :math:`x \odot M_n` multiplies every channel by the mask (the masked-out input is 0 in
    model space). The paper's S is the class probability, hence ``objective="softmax"``. Forward
    passes only (N per image, no gradient), so it runs on any model the backend runs; every image
    gets the same masks.

    Args:
        be: the backend (multisal.Backend) that runs the model.
        x: inputs (N,C,H,W) float32 in model space.
        target: None (default) for each image's top class on the clean input; an int or one int
            per image; ``"argmax_per_sample"`` (every masked copy picks its own top class); or
            ``ms.region(...)``.
        n_masks: the number N of masks (default 4000, the paper's figure for ResNet50).
        grid: the cells along each side of the coarse grid, s (default 7).
        p: the probability that a grid cell is kept (default 0.5).
        seed: the seed of the masks (default 0): the same seed gives the same masks.
        batch_size: masked inputs per backend call (default None: as many as the backend's memory
            budget holds for this input shape).
        objective: the scalar S weighting each mask (``"softmax"`` by default, the paper's
            probability; see multisal.objectives).
        normalize: scale each map to [0, 1] by its minimum and maximum (default True; False keeps
            L as the formula gives it).
        progress: show a progress bar (default False).

    Returns:
        float32 (N,H,W) maps in [0, 1]; L itself with ``normalize=False``.

    Example:
        >>> sal = ms.rise(be, x, n_masks=100, normalize=False)
        >>> sal.shape, bool(np.allclose(sal, ms.rise(be, x, n_masks=100, normalize=False, batch_size=7)))
        ((2, 32, 32), True)
    """
    check_objective(objective)
    x = check_input(x)
    masks = RiseMasks(x.shape[2:], n_masks, grid, p, seed)
    target = clean_target(be, x, target)
    n_images = len(x)
    saliency = np.zeros((n_images, x.shape[2] * x.shape[3]), np.float64)
    # Rows are mask-major (mask 0 on every image, then mask 1, ...), so a batch needs few masks.
    chunk = {}

    def make(start, stop):
        first, last = start // n_images, (stop - 1) // n_images + 1
        chunk.update(first=first, masks=masks.take(first, last))
        rows = np.arange(start, stop)
        images = rows % n_images
        return images, x[images] * chunk["masks"][rows // n_images - first][:, None], None

    for start, stop, scores in perturbed_scores(be, n_images * masks.n, make, objective, target,
                                                samples_per_call(be, batch_size, x.shape[1:]), progress, "rise"):
        rows = np.arange(start, stop)
        flat = chunk["masks"].reshape(len(chunk["masks"]), -1).astype(np.float64)
        for i in range(n_images):
            mine = rows % n_images == i
            saliency[i] += scores[mine] @ flat[rows[mine] // n_images - chunk["first"]]
    maps = (saliency / (masks.n * masks.p)).reshape(n_images, *x.shape[2:]).astype(np.float32)
    return scale_01(maps) if normalize else maps


def rise_masks(size, n_masks=4000, grid=7, p=0.5, seed=0):
    """The masks ms.rise draws for these arguments on inputs of spatial `size` (H, W): float32
    (n_masks, H, W) in [0, 1], in the order rise uses them."""
    masks = RiseMasks(size, n_masks, grid, p, seed)
    return masks.take(0, masks.n)


class RiseMasks:
    """RISE's masks for one set of arguments, made a few at a time (all of them, n_masks x H x W,
    may not fit in memory). The random draws are made at once, in this order from
    numpy's Generator(PCG64(seed)): the binary grids (N, s, s) as uniform draws < p, then each
    mask's shift, row then column, uniform integers below the cell size.

    The upsampling is the released code's skimage.transform.resize(order=1, mode="reflect",
    anti_aliasing=False): bilinear with pixel centres aligned, and beyond the grid's edge the grid
    mirrored about its outer cells (a cell outside is the one a cell inside the edge), which
    is not the edge repeated."""

    def __init__(self, size, n_masks, grid, p, seed):
        self.n = _count("n_masks", n_masks, 1, MAX_MASKS)
        self.s = _count("grid", grid, 1, None)
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0 < p <= 1:
            raise MultisalError(f"p={p!r}: the probability of keeping a grid cell must be in (0, 1]")
        self.p = float(p)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise MultisalError(f"seed={seed!r}: expected an integer >= 0")
        self.size = tuple(int(d) for d in size)
        rng = np.random.Generator(np.random.PCG64(seed))
        self.grids = (rng.random((self.n, self.s, self.s)) < self.p).astype(np.float64)
        cells = [-(-d // self.s) for d in self.size]            # ceil(H / s), ceil(W / s)
        self.shifts = np.stack([rng.integers(0, c, self.n) for c in cells], axis=1)
        # Rows of the upsampling matrices, (s + 1) * cell output pixels per axis.
        self._up = [_bilinear_matrix(self.s, (self.s + 1) * c) for c in cells]

    def take(self, start, stop):
        """Masks start..stop-1, float32 (stop - start, H, W)."""
        (height, width), (up_rows, up_cols) = self.size, self._up
        rows = up_rows[self.shifts[start:stop, 0, None] + np.arange(height)]    # (m, H, s)
        cols = up_cols[self.shifts[start:stop, 1, None] + np.arange(width)]     # (m, W, s)
        return (rows @ self.grids[start:stop] @ cols.transpose(0, 2, 1)).astype(np.float32)


def _bilinear_matrix(n, size):
    """(size, n) matrix of a linear resize of n samples to `size`, pixel centres aligned, mirrored
    about the outer samples beyond the ends (skimage's mode "reflect", scipy.ndimage's "mirror")."""
    out = np.zeros((size, n))
    u = (np.arange(size) + 0.5) * n / size - 0.5
    left = np.floor(u).astype(int)
    frac = u - left
    for index, weight in ((left, 1 - frac), (left + 1, frac)):
        np.add.at(out, (np.arange(size), _mirror(index, n)), weight)
    return out


def _mirror(index, n):
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    index = np.abs(index) % period
    return np.where(index >= n, period - index, index)


def _count(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo \
            or (hi is not None and value > hi):
        raise MultisalError(f"{name}={value!r}: expected an integer >= {lo}" + (f" and <= {hi}" if hi else ""))
    return int(value)
