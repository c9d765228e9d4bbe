"""Gradient rules of the ops that move, copy or pad values (rules/shape.py), against float64
finite differences (onnx's reference evaluator, or numpy where it falls short), at the opsets where
their form changes; and a gradient graph built at one batch size run at another."""
import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from helpers import assert_agree
from multisal.backends.onnx.grad.builder import GradientRequest, build_gradient_model, grad_name
from multisal.backends.onnx.grad.objective import TARGET_INPUT
from onnx_fd import check_body, check_body_against_numpy, classifier_head, ints, make_model, run_gradient

RNG = np.random.default_rng(1)
OPSETS = [11, 13, 18, 21]
_check = functools.partial(check_body, rng=RNG)


# ---- Concat / Split ---------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", OPSETS)
def test_concat_with_itself_and_a_constant(opset):
    body = [helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Concat", ["x", "c", "r", "x"], ["h"], axis=-1)]
    _check(body, (2, 2, 3, 2), (2, 2, 3, 7), {"c": RNG.standard_normal((2, 2, 3, 1))}, opset=opset)


@pytest.mark.parametrize("opset", [11, 13])
def test_concat_on_the_batch_axis(opset):
    # (2, ..) + (2, ..) -> (4, ..), then regrouped into 2 rows: offsets from the run-time extents.
    body = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Concat", ["r", "x"], ["c"], axis=0),
            helper.make_node("Reshape", ["c", "shape"], ["h"])]
    _check(body, (2, 3, 2), (2, 12), {"shape": ints(2, -1)}, opset=opset)


@pytest.mark.parametrize("opset", OPSETS)
def test_split_unequal_parts(opset):
    # 5 channels -> [3, 2] (num_outputs=2 from opset 18 splits 5 as 3 + 2), both parts used, reordered.
    if opset >= 18:
        split = helper.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2)
    elif opset >= 13:
        split = helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1)
    else:
        split = helper.make_node("Split", ["x"], ["a", "b"], axis=1, split=[3, 2])
    body = [split, helper.make_node("Relu", ["a"], ["ra"]), helper.make_node("Concat", ["b", "ra", "b"], ["h"], axis=1)]
    _check(body, (2, 5, 2, 2), (2, 7, 2, 2), {"sizes": ints(3, 2)}, opset=opset)


@pytest.mark.parametrize("opset", [11, 13])
def test_split_with_an_unused_output(opset):
    split = (helper.make_node("Split", ["x", "sizes"], ["a", "b", "c"], axis=2) if opset >= 13 else
             helper.make_node("Split", ["x"], ["a", "b", "c"], axis=2, split=[1, 2, 1]))
    body = [split, helper.make_node("Concat", ["c", "a"], ["h"], axis=2)]
    _check(body, (2, 2, 4, 3), (2, 2, 2, 3), {"sizes": ints(1, 2, 1)}, opset=opset)


# ---- Expand / Tile -------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", OPSETS)
def test_expand(opset):
    body = [helper.make_node("Expand", ["x", "shape"], ["h"])]
    _check(body, (2, 3, 1, 1), (2, 3, 2, 4), {"shape": ints(1, 3, 2, 4)}, opset=opset)


def test_expand_adds_a_leading_axis():
    # (2, 4) -> (3, 2, 4): the gradient sums over the new axis.
    body = [helper.make_node("Expand", ["x", "shape"], ["e"]), helper.make_node("Transpose", ["e"], ["h"], perm=[1, 0, 2])]
    _check(body, (2, 4), (2, 3, 4), {"shape": ints(3, 1, 4)}, opset=13)


@pytest.mark.parametrize("opset", OPSETS)
def test_tile(opset):
    body = [helper.make_node("Tile", ["x", "r"], ["h"])]
    _check(body, (2, 2, 3, 2), (2, 4, 3, 6), {"r": ints(1, 2, 1, 3)}, opset=opset)


# ---- Pad ----------------------------------------------------------------------------------------------
def _pad_node(opset, mode, pads, axes=None):
    if opset < 11:
        return [helper.make_node("Pad", ["x"], ["h"], mode=mode, pads=pads)], {}
    inputs = ["x", "pads", "cv"] + (["axes"] if axes is not None else [])
    inits = {"pads": np.array(pads, np.int64), "cv": np.array(0.5, np.float32)}
    if axes is not None:
        inits["axes"] = np.array(axes, np.int64)
    return [helper.make_node("Pad", inputs, ["h"], mode=mode)], inits


@pytest.mark.parametrize("opset", [10] + OPSETS)
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_modes(opset, mode):
    body, inits = _pad_node(opset, mode, [0, 0, 1, 2, 0, 0, 2, 1])
    _check(body, (2, 2, 4, 3), (2, 2, 7, 6), inits, opset=opset)


@pytest.mark.parametrize("opset", [19, 21])
@pytest.mark.parametrize("mode", ["wrap", "reflect", "edge"])
def test_pad_axes_input_and_wrap(opset, mode):
    body, inits = _pad_node(opset, mode, [2, 1, 2, 3], axes=[-1, 2])
    _check(body, (2, 2, 4, 3), (2, 2, 8, 7), inits, opset=opset)


def test_pad_constant_with_negative_pads():
    # onnx's reference evaluator cannot run negative pads (numpy.pad refuses them): numpy oracle.
    body, inits = _pad_node(13, "constant", [0, 0, -1, 2, 0, 0, 1, -2])   # H: crop 1 / add 1; W: add 2 / crop 2

    def forward(x):
        return np.pad(x[:, :, 1:, :-2], ((0, 0), (0, 0), (0, 1), (2, 0)), constant_values=0.5)
    check_body_against_numpy(body, inits, forward, (2, 2, 4, 5), RNG, opset=13)


# ---- the batch axis stays free -----------------------------------------------------------------------------
def test_gradient_graph_built_at_one_batch_runs_at_another():
    nodes = [helper.make_node("Concat", ["x", "x"], ["c"], axis=1),
             helper.make_node("Slice", ["c", "st", "en", "ax", "sp"], ["s"]),
             helper.make_node("Pad", ["s", "pads"], ["p"], mode="reflect"),
             helper.make_node("Tile", ["p", "r"], ["t"]),
             helper.make_node("Resize", ["t", "", "scales"], ["u"], mode="linear"),
             helper.make_node("Gather", ["u", "i"], ["h"], axis=1)]
    inits = {"st": ints(0, -1), "en": ints(3, -100), "ax": ints(1, 3), "sp": ints(1, -2),
             "pads": ints(0, 0, 1, 1, 0, 0, 1, 1), "r": ints(1, 1, 1, 2), "scales": np.array([1, 1, 2, 2], np.float32), "i": ints(2, 0, 2)}
    head, head_inits = classifier_head((2, 3, 10, 20), RNG)
    model = make_model(nodes + head, ("N", 2, 3, 5), ("N", 3), {**inits, **head_inits}, opset=13)
    grad_model = build_gradient_model(model, GradientRequest(), (2, 3, 5), batch=2)
    session = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x, target = RNG.standard_normal((5, 2, 3, 5)).astype(np.float32), np.array([0, 1, 2, 1, 0], np.int64)
    got = session.run([grad_name("x")], {"x": x, TARGET_INPUT: target})[0]
    expected, _ = run_gradient(model, x, target)
    assert_agree(got, expected[grad_name("x")], tol=1e-5)


# ---- Col2Im -----------------------------------------------------------------------------------------
def test_torch_fold_exports_col2im_and_differentiates(tmp_path):
    """nn.Fold (VOLO's outlooker attention folds its windows back) exports as Col2Im; the input
    gradient of fold(unfold-like columns) * weights equals torch's autograd."""
    torch = pytest.importorskip("torch")

    class Folding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fold = torch.nn.Fold((5, 6), kernel_size=3, padding=1, stride=2)
            self.weights = torch.nn.Parameter(torch.randn(1, 2, 5, 6, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            return torch.tanh(self.fold(x) * self.weights).flatten(1)

    net = Folding().eval()
    path = tmp_path / "fold.onnx"
    torch.onnx.export(net, (torch.zeros(2, 18, 9),), str(path), dynamo=False, opset_version=18)
    model = onnx.load(str(path))
    assert "Col2Im" in {n.op_type for n in model.graph.node}
    x = RNG.standard_normal((2, 18, 9)).astype(np.float32)
    values, _ = run_gradient(model, x, [3, 17])
    xt = torch.from_numpy(x).requires_grad_(True)
    (expected,) = torch.autograd.grad(net(xt)[[0, 1], [3, 17]].sum(), xt)
    assert_agree(values[grad_name(model.graph.input[0].name)], expected.numpy(), tol=1e-5)
