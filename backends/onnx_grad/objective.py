"""The objective, built into the gradient graph as its seed: d objective / d output.

Every objective is a sum over one output of weights W times a function of the scores: W is the
one-hot target of a classifier (from the target input; -1 means this pass's argmax) or the
region weights of a dense output. Its derivative is written in closed form, so no extra forward
pass and no differentiation of the objective itself is needed:
  logit            dY = W
  log_softmax      dY = W - p * sum_c W
  softmax          dY = p * (W - sum_c W p)
  chainer_prob_ce  u = -(W - q * sum_c W) with q = softmax(p), then dY = p * (u - sum_c u p)
(p = softmax(Y) over the class axis; chainer_prob_ce is the Chainer write-up's
softmax_cross_entropy applied to the softmax output.)
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from multisal.errors import MultisalError

TARGET_INPUT = "multisal_target"
REGION_INPUT = "multisal_region"
USED_TARGET = "multisal_target_used"


def _softmax(ctx, y, axis):
    # Written out: Softmax before opset 13 flattens everything after `axis`, wrong for dense outputs.
    shifted = ctx.emit("Sub", [y, ctx.reduce("ReduceMax", y, [axis])])
    e = ctx.emit("Exp", [shifted])
    return ctx.emit("Div", [e, ctx.reduce("ReduceSum", e, [axis])])


def build_seed(ctx, output, objective, region):
    """Returns (seed gradient name, extra graph inputs, extra graph outputs)."""
    shape = ctx.shape(output)
    if region:
        if len(shape) not in (3, 4):
            raise MultisalError(f"a region target needs a dense output (N,C,H,W) or (N,T,C); {output!r} has shape {shape}")
        axis = 1 if len(shape) == 4 else 2
        w = ctx.emit("Expand", [REGION_INPUT, ctx.emit("Shape", [output])])
        inputs = [helper.make_tensor_value_info(REGION_INPUT, ctx.float_type, list(shape[1:]))]
        outputs = []
    else:
        if len(shape) != 2:
            raise MultisalError(f"output {output!r} has shape {shape}; a class target needs (N, classes), "
                                "use ms.region(channel, box=...) for dense outputs")
        axis = 1
        argmax = ctx.emit("ArgMax", [output], axis=1, keepdims=0)
        used = ctx.emit("Where", [ctx.emit("Less", [TARGET_INPUT, ctx.int64s(0)]), argmax, TARGET_INPUT])
        ctx.nodes.append(helper.make_node("Identity", [used], [USED_TARGET], name=ctx.fresh("used_target")))
        classes = ctx.int64s(np.arange(shape[1]))
        w = ctx.mask(ctx.emit("Equal", [ctx.unsqueeze(USED_TARGET, [1]), classes]))
        inputs = [helper.make_tensor_value_info(TARGET_INPUT, onnx.TensorProto.INT64, ["N"])]
        outputs = [helper.make_tensor_value_info(USED_TARGET, onnx.TensorProto.INT64, ["N"])]
    if objective == "logit":
        return w, inputs, outputs
    p = _softmax(ctx, output, axis)
    if objective == "log_softmax":
        seed = ctx.emit("Sub", [w, ctx.emit("Mul", [p, ctx.reduce("ReduceSum", w, [axis])])])
    elif objective == "softmax":
        wp = ctx.reduce("ReduceSum", ctx.emit("Mul", [w, p]), [axis])
        seed = ctx.emit("Mul", [p, ctx.emit("Sub", [w, wp])])
    else:  # chainer_prob_ce
        q = _softmax(ctx, p, axis)
        u = ctx.emit("Sub", [ctx.emit("Mul", [q, ctx.reduce("ReduceSum", w, [axis])]), w])
        up = ctx.reduce("ReduceSum", ctx.emit("Mul", [u, p]), [axis])
        seed = ctx.emit("Mul", [p, ctx.emit("Sub", [u, up])])
    return seed, inputs, outputs
