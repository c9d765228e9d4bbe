"""The Chainer backend on small chains: gradients against closed forms and against chainer.grad
written out here, the three kinds of model (VGG16Layers-like, dict-returning, plain chains),
backward pruning, no parameter gradients, per-sample independence, errors, and every public
method of multisal running under numpy 1.x."""
import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np
import pytest

import multisal as ms
from detection_reference import overlap_mask
from helpers import assert_agree
from layers_protocol import LayersProtocol
from multisal.objectives import objective_from_scores


def _seeded(link, seed):
    """Deterministic weights for a small link (Chainer's own initialisers draw from numpy's global RNG)."""
    rng = np.random.default_rng(seed)
    for _, param in sorted(link.namedparams()):
        param.array[...] = rng.standard_normal(param.shape).astype(np.float32) * 0.5
    return link


class Linear(chainer.Chain):
    """logits = W flatten(x) + b: every objective's input gradient has a closed form."""

    def __init__(self, n_in=3 * 4 * 4, n_out=5):
        super().__init__()
        with self.init_scope():
            self.fc = L.Linear(n_in, n_out)

    def forward(self, x):
        return self.fc(x)


class SmallNet(chainer.Chain):
    def __init__(self, classes=7):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(3, 4, 3, pad=1)
            self.conv2 = L.Convolution2D(4, 6, 3, pad=1)
            self.fc = L.Linear(6 * 4 * 4, classes)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.max_pooling_2d(F.relu(self.conv2(h)), 2)
        return self.fc(h)


class SmallLayers(LayersProtocol, SmallNet):
    """The VGG16Layers protocol: available_layers in execution order, __call__(x, layers=[...])."""

    @property
    def functions(self):
        return {"conv1": [self.conv1, F.relu], "conv2": [self.conv2, F.relu],
                "pool": [lambda h: F.max_pooling_2d(h, 2)], "fc": [self.fc], "prob": [F.softmax]}


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)


def _closed_form(W, b, x, objective, t):
    """d objective / d x for logits = W x + b, in float64."""
    xf = x.reshape(len(x), -1).astype(np.float64)
    s = xf @ W.T.astype(np.float64) + b
    z = s - s.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    onehot = np.eye(W.shape[0])[t]
    if objective == "logit":
        dscore = onehot
    elif objective == "softmax":
        dscore = p[np.arange(len(t)), t][:, None] * (onehot - p)
    elif objective == "log_softmax":
        dscore = onehot - p
    else:   # loss = -log softmax(p)_t; d/dp = q - onehot; dp/ds = diag(p) - p p^T
        q = np.exp(p - p.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        dp = q - onehot
        dscore = p * dp - p * (p * dp).sum(1, keepdims=True)
    return (dscore @ W.astype(np.float64)).reshape(x.shape)


@pytest.mark.parametrize("objective", ["logit", "softmax", "log_softmax", "chainer_prob_ce"])
def test_input_gradient_matches_the_closed_form(objective):
    net = _seeded(Linear(), 1)
    x = np.random.default_rng(2).standard_normal((4, 3, 4, 4)).astype(np.float32)
    be = ms.load_backend("chainer", model=net)
    t = np.array([0, 3, 4, 1])
    res = be.run(x, objective, t, input_grad=True)
    np.testing.assert_allclose(res.input_grad, _closed_form(net.fc.W.array, net.fc.b.array, x, objective, t),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(res.target, t)
    assert res.input_grad.dtype == np.float32


def test_objective_matches_the_reference_values():
    """The value the backend differentiates is the sum over the batch of multisal's NumPy reference."""
    net = _seeded(Linear(), 3)
    x = np.random.default_rng(4).standard_normal((2, 3, 4, 4)).astype(np.float32)
    be = ms.load_backend("chainer", model=net)
    scores = be.predict(x)
    for objective in ("logit", "softmax", "log_softmax", "chainer_prob_ce"):
        value, _ = be._objective(chainer.Variable(scores), objective, np.array([1, 2]))
        np.testing.assert_allclose(float(value.array), objective_from_scores(scores, objective, np.array([1, 2])).sum(),
                                   rtol=1e-5)


@pytest.mark.parametrize("objective", ["logit", "chainer_prob_ce"])
def test_samples_are_independent(x, objective):
    be = ms.load_backend("chainer", model=_seeded(SmallNet(), 5))
    batch = be.run(x, objective, "argmax_per_sample", input_grad=True)
    for i in range(len(x)):
        one = be.run(x[i:i + 1], objective, "argmax_per_sample", input_grad=True)
        assert one.target[0] == batch.target[i]
        # 1e-4: a leak between samples moves a gradient by far more; a batch of one and a batch of
        # several take other BLAS blockings, whose float32 rounding reached 1.3e-5 on some CPUs.
        assert_agree(batch.input_grad[i:i + 1], one.input_grad, tol=1e-4)


def test_argmax_target_is_decided_per_pass(x):
    be = ms.load_backend("chainer", model=_seeded(SmallNet(), 6))
    res = be.run(x, "logit", "argmax_per_sample", input_grad=True)
    np.testing.assert_array_equal(res.target, res.outputs.argmax(1))
    with pytest.raises(ms.MultisalError, match="target 7 out of range: the model has 7 classes"):
        be.run(x, "logit", np.array([0, 7, 1]), input_grad=True)


def test_layer_gradients_equal_chainer_grad_and_stop_at_the_layer(x):
    net = _seeded(SmallNet(), 7)
    be = ms.load_backend("chainer", model=net)
    assert be.layer_names() == ["conv1", "conv2", "fc"]
    assert be.default_layer(x.shape[1:]) == "conv2"
    net.cleargrads()

    class Count(chainer.FunctionHook):
        name = "count"

        def __init__(self):
            self.backward = []

        def backward_preprocess(self, function, in_data, out_grad):
            self.backward.append(function.label)

    with Count() as hook:
        res = be.run(x, "logit", np.array([0, 1, 2]), layers=["conv2"])
    # Nothing below conv2 is differentiated, and no parameter gets a gradient.
    assert "Convolution2DFunction" not in hook.backward
    assert all(p.grad is None for p in net.params())
    assert res.input_grad is None
    # The same gradient written out with chainer directly.
    with chainer.using_config("train", False):
        xv = chainer.Variable(x)
        a = net.conv2(F.relu(net.conv1(xv)))
        y = net.fc(F.max_pooling_2d(F.relu(a), 2))
        g, = chainer.grad([F.sum(F.select_item(y, np.array([0, 1, 2], np.int32)))], [a])
    np.testing.assert_allclose(res.gradients["conv2"], g.array, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(res.activations["conv2"], a.array)
    # "/conv2", Chainer's own path spelling, names the same layer.
    res2 = be.run(x, "logit", np.array([0, 1, 2]), layers=["/conv2"])
    np.testing.assert_array_equal(res2.gradients["/conv2"], res.gradients["conv2"])


def test_vgg16layers_protocol(x):
    net = _seeded(SmallLayers(), 8)
    be = ms.load_backend("chainer", model=net)
    assert be.layer_names() == ["conv1", "conv2", "pool", "fc", "prob"]
    assert be.output_name == "fc"            # the layer before the softmax "prob": logits
    assert be.default_layer(x.shape[1:]) == "pool"
    res = be.run(x, "chainer_prob_ce", "argmax_per_sample", layers=["conv2", "pool"], input_grad=True)
    assert res.outputs.shape == (3, 7) and set(res.gradients) == {"conv2", "pool"}
    # chainer_prob_ce is softmax_cross_entropy(prob, t), as the write-up takes it from layers=['prob'].
    with chainer.using_config("train", False):
        xv = chainer.Variable(x)
        prob = net(xv, layers=["prob"])["prob"]
        t = prob.array.argmax(1).astype(np.int32)
        g, = chainer.grad([F.softmax_cross_entropy(prob, t, reduce="no")], [xv], grad_outputs=[np.ones(3, np.float32)])
    np.testing.assert_allclose(res.input_grad, g.array, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(res.target, t)
    # output= picks another named output.
    be_prob = ms.load_backend("chainer", model=net, output="prob")
    np.testing.assert_allclose(be_prob.predict(x).sum(1), 1, rtol=1e-6)
    with pytest.raises(ms.MultisalError, match="unknown layer 'conv3' in SmallLayers: closest: conv2, conv1"):
        be.run(x, "logit", "argmax_per_sample", layers=["conv3"])
    with pytest.raises(ms.MultisalError, match="unknown layer 'logits' in SmallLayers"):
        ms.load_backend("chainer", model=net, output="logits")


def test_dict_returning_callable(x):
    net = _seeded(SmallNet(), 9)

    def named(xv):
        c1 = net.conv1(xv)
        c2 = net.conv2(F.relu(c1))
        logits = net.fc(F.max_pooling_2d(F.relu(c2), 2))
        return {"c1": c1, "c2": c2, "logits": logits, "prob": F.softmax(logits)}

    be = ms.load_backend("chainer", model=named)
    ref = ms.load_backend("chainer", model=net)
    res = be.run(x, "log_softmax", np.array([1, 2, 3]), layers=["c2"], input_grad=True)
    want = ref.run(x, "log_softmax", np.array([1, 2, 3]), layers=["conv2"], input_grad=True)
    np.testing.assert_array_equal(res.outputs, want.outputs)
    np.testing.assert_allclose(res.input_grad, want.input_grad, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res.gradients["c2"], want.gradients["conv2"], rtol=1e-6, atol=1e-9)
    assert be.layer_names() == ["c1", "c2", "logits", "prob"] and be.output_name == "logits"
    assert be.default_layer(x.shape[1:]) == "c2"
    with pytest.raises(ms.MultisalError, match="unknown layer 'c3' in named: closest: c2, c1"):
        be.run(x, "logit", "argmax_per_sample", layers=["c3"])


def test_region_objective_on_a_dense_output():
    conv = L.Convolution2D(3, 2, 1, nobias=True)
    conv.W.array[...] = np.ones((2, 3, 1, 1), np.float32)
    be = ms.load_backend("chainer", model=chainer.Sequential(conv))
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    g = ms.vanilla_gradient(be, x, ms.region(1, box=(1, 1, 3, 4)), channel_reduce=None, abs=False)
    expected = np.zeros_like(x)
    expected[:, :, 1:3, 1:4] = 1.0
    np.testing.assert_allclose(g, expected, atol=1e-6)


def test_region_objective_on_a_channels_last_output():
    """ms.region(..., axis=-1) on an (N, H, W, C) output: the same map as on (N, C, H, W)."""
    conv = L.Convolution2D(3, 2, 1, nobias=True)
    conv.W.array[...] = np.ones((2, 3, 1, 1), np.float32)
    be = ms.load_backend("chainer", model=chainer.Sequential(conv, lambda h: F.transpose(h, (0, 2, 3, 1))))
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    g = ms.vanilla_gradient(be, x, ms.region(1, box=(1, 1, 3, 4), axis=-1), channel_reduce=None, abs=False)
    expected = np.zeros_like(x)
    expected[:, :, 1:3, 1:4] = 1.0
    np.testing.assert_allclose(g, expected, atol=1e-6)


class YoloStyle(chainer.Chain):
    """A linear map to 12 anchors of 4 + 3 values on a 4x4 input: centres in 0..4 px, sizes 0.5..2.5 px,
    sigmoid scores."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.fc = L.Linear(3 * 4 * 4, 7 * 12)

    def forward(self, x):
        raw = F.sigmoid(F.reshape(self.fc(x), (-1, 7, 12)))
        return F.concat([raw[:, :2] * 4, raw[:, 2:4] * 2 + 0.5, raw[:, 4:]], axis=1)


def test_detection_objective_on_a_yolo_style_output():
    """ms.detections on a (N, 4 + classes, anchors) output: the gradient of class 1's score summed
    over the anchors whose box overlaps the given one (tests/detection_reference.py's mask)."""
    net = _seeded(YoloStyle(), 3)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    values = net(x).array.astype(np.float64)
    cx, cy, w, h = values[0, :4, 2]
    box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    got = ms.load_backend("chainer", model=net).run(x, "logit", ms.detections(1, box=box, iou=0.3), input_grad=True)
    xv = chainer.Variable(x)
    mask = overlap_mask(values, box, 0.3).astype(np.float32)
    assert mask[0, 2] == 1
    (expected,) = chainer.grad([F.sum(net(xv)[:, 4 + 1] * mask)], [xv])
    assert_agree(got.input_grad, expected.array, tol=1e-5)


def test_clear_errors(x):
    with pytest.raises(ms.MultisalError, match="needs a chainer.Link or a callable chain, got int"):
        ms.load_backend("chainer", model=3)
    be = ms.load_backend("chainer", model=lambda xv: (xv, xv))
    with pytest.raises(ms.MultisalError, match="returns tuple; the chainer backend needs a model returning one Variable"):
        be.predict(x)
    plain = ms.load_backend("chainer", model=lambda xv: F.sum(xv, axis=(2, 3)))
    with pytest.raises(ms.MultisalError, match="unknown layer 'conv' in <lambda>: this model has no named layers"):
        plain.run(x, "logit", "argmax_per_sample", layers=["conv"])
    with pytest.raises(ms.MultisalError, match="device 'cuda' is not usable by chainer"):
        ms.load_backend("chainer", model=_seeded(SmallNet(), 1), device="cuda")
    for bad in (ms.MultisalError, ValueError):   # one type, still a ValueError for old callers
        with pytest.raises(bad):
            ms.load_backend("chainer", model=_seeded(SmallNet(), 1)).run(x, "logit", "argmax_per_sample", layers=["nope"])


def test_batch_size_from_the_memory_budget(x):
    be = ms.load_backend("chainer", model=_seeded(SmallNet(), 1), memory_budget="1MiB")
    assert 1 <= be.batch_size(x.shape[1:]) <= 256
    tiny = ms.load_backend("chainer", model=_seeded(SmallNet(), 1), memory_budget=1)
    assert tiny.batch_size(x.shape[1:]) == 1
    # Chunked runs give what one run gives.
    whole = be.run(x, "logit", "argmax_per_sample", input_grad=True)
    chunked = tiny.run(x, "logit", "argmax_per_sample", input_grad=True)
    np.testing.assert_allclose(chunked.input_grad, whole.input_grad, rtol=1e-6, atol=1e-9)


def test_every_method_runs_under_numpy_1(x, tmp_path):
    """multisal's own code in the legacy environment: methods, noise, presets, rendering."""
    assert np.__version__.startswith("1.")
    be = ms.load_backend("chainer", model=_seeded(SmallNet(), 11))
    assert ms.vanilla_gradient(be, x).shape == (3, 8, 8)
    sg = ms.smoothgrad(be, x, n=4, noise="legacy", seed=3, batch_size=3)
    assert sg.shape == (3, 8, 8) and np.isfinite(sg).all()
    np.testing.assert_allclose(ms.smoothgrad(be, x, n=4, noise="legacy", seed=3, batch_size=1), sg, rtol=1e-5, atol=1e-9)
    assert ms.smoothgrad(be, x, n=3, noise="normal", square=True, channel_reduce="mean").shape == (3, 8, 8)
    assert ms.integrated_gradients(be, x, steps=4).shape[0] == 3
    for cam in (ms.gradcam, ms.gradcam_pp):
        m = cam(be, x)
        assert m.shape[0] == 3 and m.shape[-2:] == (8, 8) and np.isfinite(m).all()
    assert ms.smooth_gradcam_pp(be, x, n=2).shape[0] == 3
    fooled, steps = ms.fooling_image(be, x[:1], target=2, max_iter=5)
    assert fooled.shape == (1, 3, 8, 8) and 0 <= steps <= 5
    vis = ms.class_visualization(be, 2, size=(8, 8), preset="raw", iterations=3, blur_every=2, max_jitter=1)
    assert vis.shape == (8, 8, 3) and vis.dtype == np.uint8
    # Rendering and presets.
    from multisal.app import render
    pre = ms.get_preset("chainer-vgg16")
    rgb = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    xin = pre.apply(rgb, size=(8, 8))
    assert xin.shape == (1, 3, 8, 8) and pre.invert(xin).shape == (1, 8, 8, 3)
    render.save_png(tmp_path / "g.png", render.grid([("photo", pre.invert(xin)[0]), ("map", render.grey(sg[0]))]))
    assert (tmp_path / "g.png").stat().st_size > 0
    photo = np.zeros((32, 32, 3), np.uint8)
    photo[8:24, 8:24] = (200, 60, 40)
    sal = np.zeros((32, 32), np.float32)
    sal[10:22, 10:22] = 1.0
    mask = ms.segment(photo, sal)
    assert mask.shape == (32, 32) and mask[16, 16] and not mask[0, 0]


def test_wrong_input_shape_is_one_line(x):
    be = ms.load_backend("chainer", model=_seeded(SmallNet(), 1))
    with pytest.raises(ms.MultisalError, match=r"SmallNet rejects inputs of shape \(N, 3, 12, 12\): .*LinearFunction") as err:
        be.predict(np.zeros((3, 3, 12, 12), np.float32))
    assert "\n" not in str(err.value)


def test_replace_overwrites_a_sublinks_output(x):
    net = _seeded(SmallNet(), 12)
    be = ms.load_backend("chainer", model=net)
    A = be.run(x, layers=["conv1"]).activations["conv1"]
    A[:, 1] = 0
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        h = F.max_pooling_2d(F.relu(net.conv2(F.relu(chainer.Variable(A)))), 2)
        expected = net.fc(h).array
    np.testing.assert_allclose(be.run(x, replace={"/conv1": A}).outputs, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(be.predict(x), be.run(x).outputs)     # the next pass is the model's own
    with pytest.raises(ms.MultisalError, match=r"replace\['conv1'\] has shape \(3, 2, 8, 8\); layer 'conv1' gives"):
        be.run(x, replace={"conv1": A[:, :2]})


def test_ablationcam_matches_the_paper_formula(x):
    # w_k = (y - y_k) / y with y_k the logit when feature map k of conv2 is zeroed, written out in Chainer.
    net = _seeded(SmallNet(), 13)
    be = ms.load_backend("chainer", model=net)
    targets = np.array([0, 3, 6])
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        A = net.conv2(F.relu(net.conv1(x))).array

        def logits(a):
            return net.fc(F.max_pooling_2d(F.relu(a), 2)).array[np.arange(3), targets].astype(np.float64)

        y = logits(A)
        weights = np.stack([(y - logits(np.where(np.arange(6)[None, :, None, None] == k, 0, A))) / y
                            for k in range(6)], axis=1)
    expected = np.maximum((weights[:, :, None, None] * A).sum(axis=1), 0)
    actual = ms.ablationcam(be, x, targets, layer="conv2", upsample=False, normalize=False)
    assert_agree(actual, expected)


def test_layers_computed_inside_one_call_cannot_be_replaced(x):
    def named(xv):
        return {"c": xv * 2, "logits": F.sum(xv * 2, axis=(2, 3))}

    for model, layer in ((_seeded(SmallLayers(), 8), "conv1"), (named, "c")):
        be = ms.load_backend("chainer", model=model)
        A = be.run(x, layers=[layer]).activations[layer]
        with pytest.raises(ms.MultisalError, match="the chainer backend cannot replace a layer's output in") as err:
            be.run(x, replace={layer: A})
        assert "\n" not in str(err.value)


def test_the_new_methods_run_under_numpy_1(x):
    be = ms.load_backend("chainer", model=_seeded(SmallNet(), 11))
    for method, kwargs in ((ms.layercam, {}), (ms.xgradcam, {}), (ms.hirescam, {}), (ms.eigencam, {}),
                           (ms.scorecam, {}), (ms.ablationcam, {}), (ms.rise, {"n_masks": 20}),
                           (ms.occlusion, {"window": (3, 4, 4), "stride": (3, 2, 2)})):
        m = method(be, x, **kwargs)
        assert m.shape == (3, 8, 8) and np.isfinite(m).all(), method.__name__
