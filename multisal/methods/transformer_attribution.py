"""Gradient-weighted attention rollout (Chefer et al. 2021): each layer's attention times its
gradient, positive part, averaged over heads, with the identity added and multiplied through."""
import numpy as np

from ..objectives import check_objective, same_pass_target
from .attention import attention_pass, rollout, token_map


def transformer_attribution(be, x, target=None, layers=None, upsample=True, normalize=True, objective="logit",
                            prefix_tokens=None, token_grid=None):
    r"""Transformer attribution (Chefer et al. 2021): attention weighted by its positive gradient, rolled out.

    Chefer, Gur and Wolf 2021, "Transformer Interpretability Beyond Attention Visualization",
    equations 13 and 14, with the attention map itself as each layer's relevance (their
    gradient-times-attention rule, without LRP). With :math:`A^{(l)}` (heads, T, T) the attention
    probabilities of layer l = 1..L and S the objective of the target class:

    .. math::
        \bar A^{(l)} = I + \operatorname*{mean}_h \Big(\frac{\partial S}{\partial A^{(l)}_h}
        \odot A^{(l)}_h\Big)^{+}, \qquad
        C = \bar A^{(L)} \bar A^{(L-1)} \cdots \bar A^{(1)}

    The map is the class token's row of C over the patch tokens, :math:`C_{0,j}` for j past the
    prefix tokens (class, distillation, register tokens), laid on the patch grid (a model with no
    prefix token takes the mean row); it is then resized to the input (bilinear) and scaled to
    [0, 1] per image. One pass on the clean input, differentiated down to the first attention layer.

    Args:
        be: the backend (multisal.Backend) that runs the model.
        x: inputs (N,C,H,W) float32 in model space.
        target: None (default) for each image's top class in this same pass, an int or one int per
            image, ``"argmax_per_sample"``, or ``ms.region(...)``.
        layers: the attention layers, (N, heads, T, T) softmax outputs in execution order
            (default None: every one the backend finds, ``multisal layers`` lists them).
        upsample: resize the map to the input's H,W (default True); False keeps the patch grid.
        normalize: scale each map to [0, 1] by its minimum and maximum (default True).
        objective: the scalar S differentiated (``"logit"`` by default; see multisal.objectives).
        prefix_tokens: how many leading tokens are no patches (default None: recognised).
        token_grid: the (rows, columns) of the patch tokens (default None: recognised).

    Returns:
        float32 (N,H,W) maps in [0, 1]; (N,h,w) on the patch grid with ``upsample=False``.

    Example:
        >>> import timm
        >>> vit = ms.load_backend("torch", model=timm.create_model("vit_tiny_patch16_224", pretrained=False,
        ...                                                         img_size=32, depth=2, num_classes=5))
        >>> ms.transformer_attribution(vit, x, target=3).shape
        (2, 32, 32)
    """
    check_objective(objective)
    attn, grads, form = attention_pass(be, x, layers, objective, same_pass_target(target, len(x)),
                                       prefix_tokens, token_grid)
    eye = np.eye(attn[0].shape[-1])
    matrices = [eye + np.maximum(g * a, 0).mean(axis=1) for a, g in zip(attn, grads)]
    return token_map(rollout(matrices), form, x.shape, upsample, normalize)
