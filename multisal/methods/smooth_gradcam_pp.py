"""Smooth Grad-CAM++ (Omeiza et al. 2019): Grad-CAM++ with the gradient's first three powers
averaged over noisy copies of the input (D1, D2, D3); the activation comes from the clean input.
Maps of single feature maps (`filters`) and of chosen neurons (`neurons`, `region`) as in the
paper's code."""
import numpy as np

from ..backend import check_input
from ..errors import MultisalError
from ..noise import DEFAULT_NOISE_LEVEL, average_over_noise
from ..objectives import check_objective, expand_target, same_pass_target, target_rows
from .cam import cam_layer, finish, gradcam_pp_weights, layer_form


def smooth_gradcam_pp(be, x, target=None, layer=None, n=4, noise_level=DEFAULT_NOISE_LEVEL, sigma=None,
                      seed=0, filters=None, neurons=None, region=False, upsample=True, normalize=True,
                      objective="logit", noise="normal", batch_size=None, progress=False, preset=None, layout=None, prefix_tokens=None,
                      token_grid=None):
    r"""Smooth Grad-CAM++ (Omeiza et al. 2019): Grad-CAM++ from gradient moments averaged over noisy inputs.

    Omeiza, Speakman, Cintas and Weldemariam 2019, "Smooth Grad-CAM++: An Enhanced Inference Level
    Visualization Technique for Deep Convolutional Neural Network Models". Grad-CAM++'s g, g^2 and
    g^3 are replaced by their means D1, D2, D3 over n noisy copies of the input, with
    :math:`g^{(t)} = \partial S / \partial A` at :math:`x + \varepsilon_t`; the activation A
    (K,h,w) is the clean input's:

    .. math::
        D_p = \frac{1}{n} \sum_{t=1}^{n} \big(g^{(t)}\big)^p, \qquad
        \alpha_{kij} = \frac{D_{2,kij}}{2 D_{2,kij} + \sum_{a,b} A_{kab}\, D_{3,kij}}
        \quad (\alpha_{kij} = 0 \text{ where } D_{1,kij} = 0), \qquad
        w_k = \sum_{i,j} \alpha_{kij}\, \mathrm{ReLU}(D_{1,kij}), \qquad
        L = \mathrm{ReLU}\Big(\sum_k w_k A_k\Big)

    with :math:`\varepsilon_t \sim \mathcal{N}(0, \sigma^2 I)` and :math:`\sigma =` noise_level
    times the width of the preset's value range (as in ``ms.smoothgrad``). As in the paper's code,
    ``filters`` gives one map per feature map, :math:`\mathrm{ReLU}(w_k A_k)`, and ``neurons``
    keeps A only at chosen positions of the layer's map (the weights still come from the whole
    layer). L is resized to the input (bilinear) and scaled to [0, 1] per map.

    Args:
        be: the backend (multisal.Backend) that runs the model.
        x: inputs (N,C,H,W) float32 in model space.
        target: None (default) for each image's top class on the clean input, kept for every
            noisy copy; an int or one int per image; ``"argmax_per_sample"`` (every copy picks its
            own); or ``ms.region(...)``.
        layer: the name of a layer whose activation is feature maps (NCHW, NHWC or tokens); None
            (default) for the backend's choice (``multisal layers`` marks it): the last feature maps
            that feed the output, or in a vision transformer the input of its last block's first norm.
        n: noisy copies per image (default 4); 0 uses the clean input's gradients alone, which is
            plain Grad-CAM++ (``ms.gradcam_pp``).
        noise_level: sigma relative to the preset's value range (default 0.15; with no preset,
            relative to each image's own max - min).
        sigma: the noise's standard deviation in model space instead (give sigma or noise_level,
            not both; default None).
        seed: the seed of every image's noise stream (default 0).
        filters: None (default) for the usual map, or a list of feature-map indices k: one map
            :math:`\mathrm{ReLU}(w_k A_k)` per index.
        neurons: None (default), or (row, col) positions on the layer's h x w map: A is zeroed
            everywhere else.
        region: with ``neurons``, keep the box between the first two positions (inclusive)
            instead of the points alone (default False).
        upsample: resize the maps to the input's H,W (default True); False keeps the layer's h,w.
        normalize: scale each map to [0, 1] by its minimum and maximum (default True).
        objective: the scalar S differentiated (``"logit"`` by default; see multisal.objectives).
        noise: ``"normal"`` (default), ``"legacy"`` or an explicit noise array, as for
            ``ms.smoothgrad``.
        batch_size: noisy copies per backend call (default None: as many as the backend's memory
            budget holds for this input shape).
        progress: show a progress bar (default False).
        preset: the preset whose value range ``noise_level`` refers to (default None: the
            backend's ``preset``).
        layout: how the layer's activation reads as feature maps: None (default) as recognised
            (``multisal layers MODEL`` shows it), ``"nchw"``, ``"nhwc"`` or ``"tokens"`` (N,T,C).
        prefix_tokens: for tokens, how many leading class, distillation or register tokens to drop
            (default None: recognised).
        token_grid: for tokens, the (rows, columns) of the remaining ones (default None: from the
            input's aspect ratio).

    Returns:
        float32 (N,H,W) maps in [0, 1]; (N,len(filters),H,W) with ``filters``; at the layer's h,w
        with ``upsample=False``; >= 0 and unscaled with ``normalize=False``.

    Example:
        >>> ms.smooth_gradcam_pp(be, x, n=4).shape, ms.smooth_gradcam_pp(be, x, filters=[0, 2]).shape
        ((2, 32, 32), (2, 2, 32, 32))
        >>> bool(np.allclose(ms.smooth_gradcam_pp(be, x, n=0), ms.gradcam_pp(be, x)))
        True
    """
    check_objective(objective)
    x = check_input(x)
    layer = cam_layer(be, x, layer)
    # A always comes from the clean input; with n=0 so do the derivatives. The clean pass also
    # decides a target of None (its argmax).
    if n == 0:
        clean = be.run(x, objective, same_pass_target(target, len(x)), layers=[layer])
    else:
        clean = be.run(x, layers=[layer])
        target = expand_target(target, len(x))
        if target is None:
            target = clean.outputs.argmax(axis=1).astype(np.int64)
    form = layer_form(be, x, layer, clean.activations[layer], layout, prefix_tokens, token_grid)
    A = form.to_maps(clean.activations[layer]).astype(np.float64)
    if n == 0:
        g = form.to_maps(clean.gradients[layer]).astype(np.float64)
        d1, d2, d3 = g, g ** 2, g ** 3
    else:
        def moments(noisy, images):
            chunk_target = target_rows(target, images)
            g = form.to_maps(be.run(noisy, objective, chunk_target, layers=[layer]).gradients[layer]).astype(np.float64)
            return g, g ** 2, g ** 3

        d1, d2, d3 = average_over_noise(moments, be, x, n=n, noise_level=noise_level, sigma=sigma, noise=noise,
                                        seed=seed, batch_size=batch_size, progress=progress, preset=preset,
                                        desc="smooth_gradcam_pp")
    weights = gradcam_pp_weights(A, d1, d2, d3)
    mask = None if not neurons else neuron_mask(neurons, region, A.shape[2:])
    return finish(A, weights, x.shape, upsample, normalize, filters=filters, mask=mask)


def neuron_mask(neurons, region, shape):
    """Where the activations are kept: the listed (row, col) points, or with region=True the box
    between the first two points (inclusive)."""
    h, w = shape
    mask = np.zeros((h, w), dtype=np.float64)
    points = []
    for p in neurons:
        try:
            r, c = (v.__index__() for v in p)   # integers only: (1.5, 2) is no neuron
        except (TypeError, ValueError, AttributeError):
            raise MultisalError(f"neuron {p!r} is not a (row, col) pair of integers") from None
        points.append((r, c))
    for r, c in points:
        if not (0 <= r < h and 0 <= c < w):
            raise MultisalError(f"neuron ({r}, {c}) is outside the layer's {h}x{w} map")
    if region:
        if len(points) < 2:
            raise MultisalError("region=True needs two neurons, the corners of a box")
        (r0, c0), (r1, c1) = points[:2]
        mask[min(r0, r1):max(r0, r1) + 1, min(c0, c1):max(c0, c1) + 1] = 1
    else:
        for r, c in points:
            mask[r, c] = 1
    return mask
