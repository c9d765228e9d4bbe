"""The gradient-free methods on the ONNX backend: forward passes of the model's own graph only, so
they run on a model whose gradient graph cannot be built, and agree with the torch backend; and
the forward pass with a layer's output replaced (Ablation-CAM's), a session of the model cut there."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import multisal as ms
from helpers import assert_agree
from multisal.backends.onnx import backend as onnx_backend

# The torch net's layer names and the ONNX graph's tensor names for the same activations.
LAYERS = {"1": "relu0", "3": "relu1"}


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 5)).eval()


def _onnx_of(net, skip=False):
    """net written as an ONNX graph by hand, with a Mod (fmod, by 1e3) on its pooled features:
    the identity on them, and an op with no gradient rule on every path to the output. skip=True
    adds the pooled input to the pooled features, a path around both convolutions."""
    def weight(name, tensor):
        return numpy_helper.from_array(tensor.detach().numpy(), name)

    inits = [weight("w0", net[0].weight), weight("b0", net[0].bias), weight("w1", net[2].weight),
             weight("b1", net[2].bias), weight("wf", net[6].weight), weight("bf", net[6].bias),
             numpy_helper.from_array(np.array(1e3, np.float32), "modulus")]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["conv0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv0"], ["relu0"]),
             helper.make_node("Conv", ["relu0", "w1", "b1"], ["conv1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["conv1"], ["relu1"]),
             helper.make_node("GlobalAveragePool", ["relu1"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["features"]),
             helper.make_node("Mod", ["features", "modulus"], ["kept"], fmod=1)]
    head = "kept"
    if skip:
        inits.append(numpy_helper.from_array(np.ones((3, 6), np.float32), "spread"))
        nodes += [helper.make_node("GlobalAveragePool", ["x"], ["pooled_x"]),
                  helper.make_node("Flatten", ["pooled_x"], ["flat_x"]),
                  helper.make_node("MatMul", ["flat_x", "spread"], ["spread_x"]),
                  helper.make_node("Add", ["kept", "spread_x"], ["summed"])]
        head = "summed"
    nodes.append(helper.make_node("Gemm", [head, "wf", "bf"], ["y"], transB=1))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(2).random((2, 3, 32, 32), dtype=np.float32)


@pytest.fixture
def backends(tmp_path, monkeypatch):
    """(torch backend, ONNX backend of the same function with a Mod, its empty cache folder); the
    ONNX backend fails the test if it builds a gradient graph."""
    def no_gradient_graph(*_args, **_kwargs):
        raise AssertionError("a forward-only method asked for a gradient graph")

    net = _net()
    bo = ms.load_backend("onnx", model=_onnx_of(net), cache_dir=str(tmp_path / "cache"))
    bt = ms.load_backend("torch", model=net)
    monkeypatch.setattr(onnx_backend, "build_gradient_model", no_gradient_graph)
    return bt, bo, tmp_path / "cache"


def test_the_models_gradient_graph_cannot_be_built(tmp_path, x):
    bo = ms.load_backend("onnx", model=_onnx_of(_net()), cache_dir=str(tmp_path))
    with pytest.raises(ms.MultisalError, match="no gradient rule for op Mod"):
        ms.vanilla_gradient(bo, x)
    with pytest.raises(ms.MultisalError, match="no gradient rule for op Mod"):
        ms.gradcam(bo, x, layer="relu1")


@pytest.mark.parametrize("method, kwargs", [
    (ms.occlusion, dict(window=(3, 12, 12), stride=(3, 10, 10), channel_reduce=None, normalize=False)),
    (ms.rise, dict(n_masks=40, grid=4, normalize=False)),
    (ms.scorecam, dict(layer="3", upsample=False, normalize=False)),
    (ms.ablationcam, dict(layer="3", upsample=False, normalize=False)),
    (ms.ablationcam, dict(layer="1", upsample=False, normalize=False)),
    (ms.eigencam, dict(layer="3", upsample=False, normalize=False)),
])
def test_forward_only_methods_run_without_a_gradient_graph_and_agree_with_torch(backends, x, method, kwargs):
    bt, bo, cache = backends
    expected = method(bt, x, target=[1, 3], **kwargs)
    onnx_kwargs = dict(kwargs, layer=LAYERS[kwargs["layer"]]) if "layer" in kwargs else kwargs
    actual = method(bo, x, target=[1, 3], **onnx_kwargs)
    assert np.abs(expected).max() > 0
    assert_agree(actual, expected)
    assert not cache.exists() or not any(cache.iterdir())
    assert all(key[0] in ("forward", "replace") for key in bo._sessions)


def test_a_replaced_layer_is_fed_to_a_session_cut_there(backends, x):
    bt, bo, _ = backends
    A = bt.run(x, layers=["1"]).activations["1"]
    A[:, 2] = 0
    assert_agree(bo.run(x, replace={"relu0": A}).outputs, bt.run(x, replace={"1": A}).outputs)
    cut = bo._sessions[("replace", ("relu0",))]
    assert [i.name for i in cut.get_inputs()] == ["relu0"]   # nothing below the cut runs
    with pytest.raises(ms.MultisalError, match=r"replace\['relu0'\] has shape \(2, 3, 32, 32\); layer 'relu0' gives"):
        bo.run(x, replace={"relu0": A[:, :3]})


def test_a_path_around_the_cut_keeps_the_models_input(tmp_path, x):
    net = _net()
    bo = ms.load_backend("onnx", model=_onnx_of(net, skip=True), cache_dir=str(tmp_path))
    R = np.random.default_rng(0).random((2, 6, 16, 16), dtype=np.float32)
    with torch.no_grad():
        features = torch.from_numpy(R).mean(dim=(2, 3)) + torch.from_numpy(x).mean(dim=(2, 3)).sum(1, keepdim=True)
        expected = net[6](features).numpy()
    assert_agree(bo.run(x, replace={"relu1": R}).outputs, expected)
    assert sorted(i.name for i in bo._sessions[("replace", ("relu1",))].get_inputs()) == ["relu1", "x"]


def test_explain_runs_the_forward_only_methods_on_a_model_without_gradient_rules(tmp_path):
    # The job's set-up probes the backward pass only for methods that need one.
    model = tmp_path / "mod.onnx"
    onnx.save(_onnx_of(_net()), str(model))
    config = {"backend": "onnx", "model": str(model), "preset": "raw", "size": [32, 32],
              "inputs": ["skimage:chelsea"], "output": str(tmp_path / "out"),
              "onnx": {"cache_dir": str(tmp_path / "cache")},
              "methods": ["occlusion", "rise", "scorecam", "ablationcam", "eigencam"], "rise": {"n_masks": 20},
              "scorecam": {"layer": "relu0"}}
    run = ms.run_explain(config, progress=False)
    assert run.records[0]["status"] == "ok", run.records[0]["error"]
    for name in config["methods"]:
        assert np.load(run.output / run.records[0]["folder"] / f"{name}.npy").shape == (32, 32)
    with pytest.raises(ms.MultisalError, match="no gradient rule for op Mod"):
        ms.run_explain({**config, "methods": ["occlusion", "gradcam"]}, progress=False)
