"""Attention rollout (Abnar and Zuidema 2020): a vision transformer's attention, averaged over
heads, with the residual connection added, multiplied through the layers."""
import numpy as np

from ..errors import MultisalError
from .attention import attention_pass, fuse_heads, rollout, token_map


def attention_rollout(be, x, layers=None, discard_ratio=0.0, head_fusion="mean", target=None, upsample=True,
                      normalize=True, prefix_tokens=None, token_grid=None):
    r"""Attention rollout (Abnar et al. 2020): how much attention flows from each patch to the class token.

    Abnar and Zuidema 2020, "Quantifying Attention Flow in Transformers". With
    :math:`A^{(l)}` (heads, T, T) the attention probabilities of layer l = 1..L, fused over
    heads (the mean by default), the residual connection accounted for by the identity, and the
    layers multiplied through:

    .. math::
        \bar A^{(l)} = \operatorname*{mean}_h A^{(l)}_h, \qquad
        \hat A^{(l)}_{ij} = \frac{\bar A^{(l)}_{ij} + \delta_{ij}}{\sum_k (\bar A^{(l)}_{ik} + \delta_{ik})}, \qquad
        R = \hat A^{(L)} \hat A^{(L-1)} \cdots \hat A^{(1)}

    The map is the class token's row of R over the patch tokens, :math:`R_{0,j}` for j past the
    prefix tokens (class, distillation, register tokens), laid on the patch grid; a model with
    no prefix token takes the mean row. With discard_ratio = 0 the row normalisation makes
    :math:`\hat A = (\bar A + I)/2`, the paper's; ``discard_ratio`` > 0 first sets that fraction
    of each fused matrix's smallest entries to 0 (never the class token's attention to itself),
    as in the vit-explain code. One forward pass, no gradient: the same map for every class.
    The map is then resized to the input (bilinear) and scaled to [0, 1] per image.

    Args:
        be: the backend (multisal.Backend) that runs the model.
        x: inputs (N,C,H,W) float32 in model space.
        layers: the attention layers, (N, heads, T, T) softmax outputs in execution order
            (default None: every one the backend finds, ``multisal layers`` lists them).
        discard_ratio: the fraction of smallest fused attention entries set to 0 per layer (default 0).
        head_fusion: ``"mean"`` (default, the paper's), ``"max"`` or ``"min"`` over heads.
        target: not used (default None): rollout is class-agnostic; accepted so that every
            method is called alike.
        upsample: resize the map to the input's H,W (default True); False keeps the patch grid.
        normalize: scale each map to [0, 1] by its minimum and maximum (default True).
        prefix_tokens: how many leading tokens are no patches (default None: recognised).
        token_grid: the (rows, columns) of the patch tokens (default None: recognised).

    Returns:
        float32 (N,H,W) maps in [0, 1]; (N,h,w) on the patch grid with ``upsample=False``.

    Example:
        >>> import timm
        >>> vit = ms.load_backend("torch", model=timm.create_model("vit_tiny_patch16_224", pretrained=False,
        ...                                                         img_size=32, depth=2, num_classes=5))
        >>> ms.attention_rollout(vit, x).shape, ms.attention_rollout(vit, x, upsample=False).shape
        ((2, 32, 32), (2, 2, 2))
    """
    if not 0 <= discard_ratio < 1:
        raise MultisalError(f"discard_ratio={discard_ratio!r} must be in [0, 1)")
    attn, _, form = attention_pass(be, x, layers, prefix_tokens=prefix_tokens, token_grid=token_grid)
    matrices = []
    for a in attn:
        fused = fuse_heads(a, head_fusion)
        n, tokens, _ = fused.shape
        if discard_ratio > 0:
            flat = fused.reshape(n, -1).copy()
            drop = np.argsort(flat, axis=1, kind="stable")[:, :int(tokens * tokens * discard_ratio)]
            for i in range(n):
                flat[i, drop[i][drop[i] != 0]] = 0
            fused = flat.reshape(n, tokens, tokens)
        mixed = fused + np.eye(tokens)
        matrices.append(mixed / mixed.sum(axis=-1, keepdims=True))
    return token_map(rollout(matrices), form, x.shape, upsample, normalize)
