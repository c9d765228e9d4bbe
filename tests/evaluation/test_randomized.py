"""Backend.randomized, the seam member the model-randomisation check needs: a new backend over a
copy of the model with the named layers random, the user's model untouched, on torch
(reset_parameters) and ONNX (each initializer's values permuted); a backend that cannot says so
in one line."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import multisal as ms
import numpy_backend as nb
from multisal.backend import Backend
from multisal.backends.chainer.backend import ChainerBackend
from multisal.evaluation import sanity


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 5)).eval()


def _onnx_model():
    net = _net()
    inits = [numpy_helper.from_array(t.detach().numpy(), name) for name, t in
             (("w0", net[0].weight), ("b0", net[0].bias), ("w1", net[3].weight), ("b1", net[3].bias),
              ("wf", net[7].weight), ("bf", net[7].bias))]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["conv0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv0"], ["relu0"]),
             helper.make_node("Conv", ["relu0", "w1", "b1"], ["conv1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["conv1"], ["relu1"]),
             helper.make_node("GlobalAveragePool", ["relu1"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["features"]),
             helper.make_node("Gemm", ["features", "wf", "bf"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(2).random((2, 3, 32, 32), dtype=np.float32)


def test_torch_randomized_resets_a_copy_and_leaves_the_model(x):
    net = _net()
    be = ms.load_backend("torch", model=net, preset="raw")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    outputs = be.predict(x)
    rng_state = torch.random.get_rng_state()
    assert be.parameter_layers() == ["0", "1", "3", "7"]
    copy = be.randomized(["7", "3"], seed=5)
    assert isinstance(copy, type(be)) and copy.model is not net
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        expected_head = torch.nn.Linear(6, 5)
    torch.testing.assert_close(copy.model[7].weight, expected_head.weight)
    torch.testing.assert_close(copy.model[0].weight, net[0].weight)
    assert not torch.equal(copy.model[3].weight, net[3].weight)
    assert not np.allclose(copy.predict(x), outputs)
    # The user's model and the backend are as they were.
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    np.testing.assert_array_equal(be.predict(x), outputs)


def test_onnx_randomized_permutes_the_initializers_of_a_copy(x, tmp_path):
    be = ms.load_backend("onnx", model=_onnx_model(), preset="raw", cache_dir=str(tmp_path))
    outputs = be.predict(x)
    assert be.parameter_layers() == ["conv0", "conv1", "y"]
    copy = be.randomized(["y", "conv1"], seed=1)
    original = {i.name: numpy_helper.to_array(i) for i in be.model.graph.initializer}
    changed = {i.name: numpy_helper.to_array(i) for i in copy.model.graph.initializer}
    np.testing.assert_array_equal(changed["w0"], original["w0"])
    for name in ("w1", "b1", "wf", "bf"):
        assert not np.array_equal(changed[name], original[name]), name
        np.testing.assert_array_equal(np.sort(changed[name], axis=None), np.sort(original[name], axis=None))
    assert not np.allclose(copy.predict(x), outputs)
    np.testing.assert_array_equal(be.predict(x), outputs)
    # Cascading: a layer randomised at an earlier step holds the same values at a later one.
    again = {i.name: numpy_helper.to_array(i) for i in be.randomized(["y"], seed=1).model.graph.initializer}
    np.testing.assert_array_equal(again["wf"], changed["wf"])
    # The copy's gradient graphs stay out of the disk cache.
    ms.gradcam(copy, x)
    assert not list(tmp_path.iterdir())
    scores, layers = sanity.model_randomization(be, x, lambda b, xx, t: ms.gradcam(b, xx, target=t), ms.gradcam(be, x),
                                                steps=None)
    assert layers == ["y", "conv1", "conv0"] and scores.shape == (2, 3)
    assert np.all(np.abs(scores) <= 1 + 1e-12) and scores[:, -1].max() < 0.99


@pytest.mark.parametrize("call, message", [
    (lambda be: be.randomized(["8"]), "layer '8' of Sequential has no parameters to randomise: layers with parameters: 0, 1, 3, 7"),
    (lambda be: be.randomized([]), "randomized() takes a non-empty list of layer names, got []"),
    (lambda be: be.randomized(["7"], seed=-1), "seed=-1: expected an integer >= 0"),
])
def test_randomized_bad_input_is_one_line(x, call, message):
    be = ms.load_backend("torch", model=_net(), preset="raw")
    with pytest.raises(ms.MultisalError) as err:
        call(be)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_backend_that_cannot_randomise_says_so(numpy_backend_class, x):
    be = numpy_backend_class(nb.classifier())
    maps = {"vanilla_gradient": ms.vanilla_gradient(be, x)}
    for call in (lambda: be.randomized(["conv1"]), lambda: ms.evaluate(be, x, maps, metrics=["randomization"])):
        with pytest.raises(ms.MultisalError, match=r"^backend 'numpy' cannot randomise its model's parameters "
                                                   r"\(randomized\(\.\.\.\)\), which the model-randomisation sanity "
                                                   r"check needs$"):
            call()
    # The other metrics run on it, and Chainer's backend is one that refuses.
    assert set(ms.evaluate(be, x, maps, metrics=["random_logit", "sparseness"])["vanilla_gradient"]) == \
        {"random_logit", "sparseness"}
    assert ChainerBackend._randomized is Backend._randomized
