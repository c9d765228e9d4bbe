"""Gradient rules of the ops that select values (rules/indexing.py), against float64 finite
differences (onnx's reference evaluator), at the opsets where their form changes."""
import functools

import numpy as np
import pytest
from onnx import helper

from onnx_fd import check_body, ints

RNG = np.random.default_rng(1)
OPSETS = [11, 13, 18, 21]
_check = functools.partial(check_body, rng=RNG)


# ---- Slice ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", OPSETS)
def test_slice_negative_indices_and_steps(opset):
    # axis 2 (7): from -1 back to (clamped) the start, step -2 -> rows 6, 4, 2, 0
    # axis -1 (6): from 1 to -1 by 2 -> columns 1, 3; axis 1: the full range with an end past it.
    body = [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["h"])]
    inits = {"st": ints(-1, 1, 0), "en": ints(-100, -1, 2 ** 62), "ax": ints(2, -1, 1), "sp": ints(-2, 2, 1)}
    _check(body, (2, 2, 7, 6), (2, 2, 4, 2), inits, opset=opset)


@pytest.mark.parametrize("opset", [13, 21])
def test_slice_strided_on_two_axes_last_axis_first(opset):
    # W: 1, 4 (then padded back to 6); H: 5, 3, 1 -- the H dilation reshapes a W axis not yet padded back.
    body = [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["h"])]
    inits = {"st": ints(1, 5), "en": ints(5, 0), "ax": ints(3, 2), "sp": ints(3, -2)}
    _check(body, (2, 2, 7, 6), (2, 2, 3, 2), inits, opset=opset)


@pytest.mark.parametrize("opset", [11, 13])
def test_slice_steps_one_and_three_default_axes(opset):
    body = [helper.make_node("Slice", ["x", "st", "en"], ["h"])]
    _check(body, (2, 3, 5), (2, 2, 4), {"st": ints(0, 1, -5), "en": ints(10, 3, 4)}, opset=opset)
    body = [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["h"])]
    _check(body, (2, 3, 8), (2, 3, 2), {"st": ints(1), "en": ints(7), "ax": ints(2), "sp": ints(3)}, opset=opset)


@pytest.mark.parametrize("opset", [11, 18])
def test_slice_with_ends_computed_at_run_time(opset):
    # end = width - 4 from Shape: the rule cannot read it at build time and goes through a one-hot.
    body = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "two"], ["w"]),
            helper.make_node("Sub", ["w", "four"], ["end"]),
            helper.make_node("Slice", ["x", "st", "end", "ax", "sp"], ["h"])]
    inits = {"two": ints(2), "four": ints(4), "st": ints(-1), "ax": ints(2), "sp": ints(-1)}
    _check(body, (2, 2, 5), (2, 2, 3), inits, opset=opset)


# ---- Gather / GatherElements ------------------------------------------------------------------------
@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("index", [0, -1])
def test_gather_scalar_index_class_token(opset, index):
    body = [helper.make_node("Gather", ["x", "i"], ["h"], axis=1)]
    _check(body, (2, 5, 4), (2, 4), {"i": np.array(index, np.int64)}, opset=opset)


@pytest.mark.parametrize("opset", OPSETS)
def test_gather_repeated_and_negative_indices(opset):
    body = [helper.make_node("Gather", ["x", "i"], ["h"], axis=2)]
    _check(body, (2, 2, 4, 3), (2, 2, 2, 3, 3), {"i": np.array([[1, -1, 1], [3, 0, 1]], np.int64)}, opset=opset)


@pytest.mark.parametrize("opset", [11, 18])
def test_gather_indices_computed_at_run_time(opset):
    body = [helper.make_node("Cast", ["fi"], ["i"], to=7), helper.make_node("Gather", ["x", "i"], ["h"], axis=-1)]
    _check(body, (2, 2, 4), (2, 2, 5), {"fi": np.array([2, 2, -1, 0, 2])}, opset=opset)


def test_gather_contiguous_indices_on_the_last_axis():
    body = [helper.make_node("Gather", ["x", "i"], ["h"], axis=2)]
    _check(body, (2, 3, 5), (2, 3, 3), {"i": ints(1, 2, 3)}, opset=13)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("repeats", [True, False])
def test_gather_elements(opset, repeats):
    idx = (np.array([[[0, 0], [2, -1]], [[1, 1], [1, 0]]]) if repeats else
           np.array([[[0, 1], [2, 0]], [[1, 2], [0, 1]]]))
    idx = np.broadcast_to(idx, (2, 2, 2, 2)).astype(np.int64).copy()
    body = [helper.make_node("GatherElements", ["x", "i"], ["h"], axis=2)]
    _check(body, (2, 2, 3, 2), (2, 2, 2, 2), {"i": idx}, opset=opset)
