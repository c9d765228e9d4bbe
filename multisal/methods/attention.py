"""What the attention methods share (attention_rollout.py, transformer_attribution.py): reading a
vision transformer's attention probabilities as layers, laying a row of token relevances on the
patch grid, and the rollout of per-layer token-mixing matrices.

The attention layers are the softmax outputs (N, heads, T, T) over the model's token sequence
(Backend.attention_layers: on torch the probabilities timm's attention modules pass through their
`attn_drop`, on ONNX the Softmax nodes inside attention). Which tokens are prefix tokens (class,
distillation, register) and which grid the others form comes from the token layers of the same
length T (multisal.layouts), or from `prefix_tokens` and `token_grid`.
"""
import numpy as np

from ..backend import check_input
from ..errors import MultisalError
from ..layouts import resolve_layout
from ..maps import resize_maps, scale_01

HEAD_FUSIONS = ("mean", "max", "min")


def attention_names(be, x, layers):
    """The attention layers a method reads: those named, or every one the backend finds."""
    if layers is None:
        layers = be.attention_layers(x.shape[1:])
        if not layers:
            raise MultisalError(f"{be.describe()} shows no attention probabilities (softmax outputs (N, heads, T, T) "
                                "over its tokens): name them with layers=[...] (`multisal layers` lists those it finds)")
        return list(layers)
    if isinstance(layers, str) or not list(layers):
        raise MultisalError(f"layers={layers!r} must be a non-empty list of attention layer names")
    return list(layers)


def check_attention(name, a, tokens=None):
    """An attention layer's activation must be (N, heads, T, T), with the T of the other layers."""
    if a.ndim != 4 or a.shape[2] != a.shape[3] or (tokens is not None and a.shape[2] != tokens):
        expected = "(N, heads, T, T)" if tokens is None else f"(N, heads, {tokens}, {tokens})"
        raise MultisalError(f"layer {name!r} gives an activation of shape {a.shape}; attention probabilities are "
                            f"{expected}")


def token_form(be, x, layer, tokens, prefix_tokens=None, token_grid=None):
    """The tokens Layout of a sequence of `tokens` tokens: its prefix and grid as the model's token
    layers of that length have them, or as prefix_tokens and token_grid say."""
    layouts = be.layer_layouts(x.shape[1:])
    grids = [found.grid for found in layouts.values() if found.kind != "tokens"]
    known = [found for found in layouts.values() if found.kind == "tokens"
             and found.prefix + found.grid[0] * found.grid[1] == tokens]
    if known and prefix_tokens is None and token_grid is None:
        return known[-1]
    return resolve_layout(layer, (1, tokens, 1), x.shape[2:], None, "tokens", prefix_tokens, token_grid, grids)


def fuse_heads(a, head_fusion):
    """(N, heads, T, T) -> (N, T, T) by the mean, max or min over heads."""
    if head_fusion not in HEAD_FUSIONS:
        raise MultisalError(f"head_fusion={head_fusion!r} must be one of {', '.join(map(repr, HEAD_FUSIONS))}")
    return getattr(np, head_fusion)(a, axis=1)


def rollout(matrices):
    """The product M_L ... M_1 of per-layer (N, T, T) matrices, first layer rightmost."""
    joint = matrices[0]
    for m in matrices[1:]:
        joint = m @ joint
    return joint


def token_map(joint, form, x_shape, upsample, normalize):
    """The relevance of the grid tokens for the first token (the class token; with no prefix
    token, the mean over all tokens) as (N, h, w) maps, resized and scaled as asked."""
    rows = joint[:, 0, :] if form.prefix > 0 else joint.mean(axis=1)
    h, w = form.grid
    maps = rows[:, form.prefix:].reshape(len(rows), h, w).astype(np.float32)
    if upsample:
        maps = resize_maps(maps, x_shape[2:])
    if normalize:
        maps = scale_01(maps)
    return maps


def attention_pass(be, x, layers, objective=None, target=None, prefix_tokens=None, token_grid=None):
    """One pass: ({layer: attention (N, heads, T, T) float64}, {layer: its gradient} or None, the
    token Layout) for the attention layers named or found."""
    x = check_input(x)
    names = attention_names(be, x, layers)
    res = be.run(x, layers=names) if objective is None else be.run(x, objective, target, layers=names)
    tokens = res.activations[names[0]].shape[-1] if res.activations[names[0]].ndim == 4 else None
    for name in names:
        check_attention(name, res.activations[name], tokens)
    form = token_form(be, x, names[-1], tokens, prefix_tokens, token_grid)
    attn = [res.activations[n].astype(np.float64) for n in names]
    grads = None if objective is None else [res.gradients[n].astype(np.float64) for n in names]
    return attn, grads, form
