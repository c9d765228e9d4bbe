"""Gradient rules of LSTM and GRU (rules/recurrent.py), against float64 finite differences of a
numpy LSTM and GRU written here from the ONNX operator definitions (onnx's reference evaluator
ignores sequence_lens and activations), and torch's nn.LSTM / nn.GRU exports against autograd."""
import warnings

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import assert_agree
from multisal.backends.onnx.grad.builder import grad_name
from multisal.errors import MultisalError
from onnx_fd import check_body_against_numpy, make_model, run_gradient

RNG = np.random.default_rng(3)
T, B, I, H = 4, 2, 3, 3
ACTS = {"Sigmoid": lambda v: 1 / (1 + np.exp(-v)), "Tanh": np.tanh, "Relu": lambda v: np.maximum(v, 0)}


def _lstm_cell(acts, x, h, c, w, r, b, p):
    f, g, hh = (ACTS[a] for a in acts)
    gates = x @ w.T + h @ r.T + b[:4 * H] + b[4 * H:]
    gi, go, gf, gc = np.split(gates, 4, axis=-1)
    i = f(gi + p[:H] * c)
    ft = f(gf + p[2 * H:] * c)
    c_new = ft * c + i * g(gc)
    o = f(go + p[H:2 * H] * c_new)
    return o * hh(c_new), c_new


def _gru_cell(acts, x, h, w, r, b, before_reset):
    f, g = (ACTS[a] for a in acts)
    wb, rb = b[:3 * H], b[3 * H:]
    xz, xr, xh = np.split(x @ w.T + wb, 3, axis=-1)
    rz, rr_, rh = np.split(r, 3, axis=0)
    z = f(xz + h @ rz.T + rb[:H])
    reset = f(xr + h @ rr_.T + rb[H:2 * H])
    if before_reset:
        n = g(xh + reset * (h @ rh.T + rb[2 * H:]))
    else:
        n = g(xh + (reset * h) @ rh.T + rb[2 * H:])
    return (1 - z) * n + z * h


def reference(op, x, w, r, b, direction="forward", lengths=None, h0=None, c0=None, p=None, acts=None,
              before_reset=0):
    """An ONNX LSTM / GRU of layout 0 in float64: X (T, B, I) -> Y (T, D, B, H), Y_h, Y_c. A
    sequence of length L runs steps 0..L-1 (reverse: L-1..0), Y is 0 past its end and Y_h is its
    state after its last step, as onnxruntime computes them."""
    steps, batch = x.shape[:2]
    dirs = 2 if direction == "bidirectional" else 1
    per = 3 if op == "LSTM" else 2
    acts = acts or (["Sigmoid", "Tanh", "Tanh"] if op == "LSTM" else ["Sigmoid", "Tanh"]) * dirs
    lengths = np.full(batch, steps) if lengths is None else lengths
    y = np.zeros((steps, dirs, batch, H))
    yh, yc = np.zeros((dirs, batch, H)), np.zeros((dirs, batch, H))
    for d in range(dirs):
        reverse = direction == "reverse" or d == 1
        for n in range(batch):
            h = np.zeros(H) if h0 is None else h0[d, n]
            c = np.zeros(H) if c0 is None else c0[d, n]
            order = range(lengths[n])
            for t in (reversed(order) if reverse else order):
                a = acts[d * per:(d + 1) * per]
                if op == "LSTM":
                    h, c = _lstm_cell(a, x[t, n], h, c, w[d], r[d], b[d], np.zeros(3 * H) if p is None else p[d])
                else:
                    h = _gru_cell(a, x[t, n], h, w[d], r[d], b[d], before_reset)
                y[t, d, n] = h
            yh[d, n], yc[d, n] = h, c
    return y, yh, yc


def _weights(op, dirs):
    gates = 4 if op == "LSTM" else 3
    return {"W": RNG.standard_normal((dirs, gates * H, I)) * 0.5, "R": RNG.standard_normal((dirs, gates * H, H)) * 0.5,
            "B": RNG.standard_normal((dirs, 2 * gates * H)) * 0.3}


def _check(op, direction, lengths=None, initial=False, peepholes=False, acts=None, before_reset=0, opset=14):
    """x (B, I, T) -> the node's X -> [Y, Y_h, Y_c] side by side in h; initial states (when asked)
    computed from x, so their gradients flow back to it too."""
    dirs = 2 if direction == "bidirectional" else 1
    inits = _weights(op, dirs)
    attrs = {"hidden_size": H, "direction": direction}
    if acts:
        attrs["activations"] = acts
    if op == "GRU":
        attrs["linear_before_reset"] = before_reset
    x_node = helper.make_node("Transpose", ["x"], ["X"], perm=[2, 0, 1])
    nodes = [x_node]
    inputs = ["X", "W", "R", "B", "", "", "", ""]
    if lengths is not None:
        inits["lengths"] = np.asarray(lengths, np.int32)
        inputs[4] = "lengths"
    n_states = 2 if op == "LSTM" else 1
    if initial:   # h0 (D, B, H) = tanh(mean over time of x @ V), per state
        inits["V"] = RNG.standard_normal((n_states, I, dirs * H)) * 0.5
        inits["mean"] = np.full(T, 1.0 / T)
        nodes.append(helper.make_node("MatMul", ["x", "mean"], ["xm"]))                             # (B, I)
        for k, name in enumerate(["h0", "c0"][:n_states]):
            inits[f"V{k}"] = inits["V"][k]
            inits[f"shape{k}"] = np.array([0, dirs, H], np.int64)
            nodes += [helper.make_node("MatMul", ["xm", f"V{k}"], [f"m{k}"]),
                      helper.make_node("Tanh", [f"m{k}"], [f"t{k}"]),
                      helper.make_node("Reshape", [f"t{k}", f"shape{k}"], [f"s{k}"]),            # (B, D, H)
                      helper.make_node("Transpose", [f"s{k}"], [name], perm=[1, 0, 2])]
            inputs[5 + k] = name
        del inits["V"]
    if peepholes:
        inits["P"] = RNG.standard_normal((dirs, 3 * H)) * 0.5
        inputs[7] = "P"
    while not inputs[-1]:
        inputs.pop()
    outputs = ["Y", "Yh", "Yc"][:n_states + 1]
    nodes.append(helper.make_node(op, inputs, outputs, **attrs))
    inits["flat"] = np.array([0, -1], np.int64)
    for name in outputs:
        # batch to the front: Y (T, D, B, H), Y_h (D, B, H)
        nodes += [helper.make_node("Transpose", [name], [f"{name}b"], perm=[2, 0, 1, 3] if name == "Y" else [1, 0, 2]),
                  helper.make_node("Reshape", [f"{name}b", "flat"], [f"{name}f"])]
    nodes.append(helper.make_node("Concat", [f"{name}f" for name in outputs], ["h"], axis=1))

    def forward(x):
        xs = x.transpose(2, 0, 1)                                                     # (T, B, I)
        states = {}
        if initial:
            for k, name in enumerate(["h0", "c0"][:n_states]):
                states[name] = np.tanh(x.mean(2) @ inits[f"V{k}"]).reshape(len(x), dirs, H).transpose(1, 0, 2)
        y, yh, yc = reference(op, xs, inits["W"], inits["R"], inits["B"], direction,
                              None if lengths is None else np.asarray(lengths), p=inits.get("P"), acts=acts,
                              before_reset=before_reset, **states)
        parts = [y.transpose(2, 0, 1, 3), yh.transpose(1, 0, 2), yc.transpose(1, 0, 2)][:n_states + 1]
        return np.concatenate([v.reshape(len(x), -1) for v in parts], axis=1)

    check_body_against_numpy(nodes, inits, forward, (B, I, T), RNG, opset)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_sequence_lengths_and_initial_states(op, direction):
    """Sequences of lengths 4 and 2 (steps past the end keep the state and write zeros), initial
    states computed from the input; Y, Y_h (and Y_c) all explained."""
    _check(op, direction, lengths=[T, 2], initial=True)


@pytest.mark.parametrize("before_reset", [0, 1])
def test_gru_reset_forms(before_reset):
    _check("GRU", "bidirectional", before_reset=before_reset, opset=11)


def test_lstm_peepholes():
    _check("LSTM", "bidirectional", peepholes=True, initial=True)


@pytest.mark.parametrize("op, acts", [("LSTM", ["Sigmoid", "Relu", "Tanh"]), ("GRU", ["Tanh", "Relu"])])
def test_other_activations(op, acts):
    _check(op, "forward", acts=acts, opset=21)


def _single(op, weights=None, **attrs):
    """x (1, T, I) -> the node -> Y summed over time and directions: (1, H) scores."""
    inits = {**_weights(op, 1), "axes": np.array([0, 1], np.int64)}
    nodes = [helper.make_node("Transpose", ["x"], ["X"], perm=[1, 0, 2]),
             helper.make_node(op, ["X", weights or "W", "R", "B"], ["Y"], name="rnn", hidden_size=H, **attrs),
             helper.make_node("ReduceSum", ["Y", "axes"], ["y"], keepdims=0)]
    return nodes, inits


@pytest.mark.parametrize("attrs, message", [({"clip": 1.0}, "rnn.*clip"), ({"activations": ["Sigmoid", "Elu", "Tanh"]},
                                                                            "rnn.*activations")])
def test_unsupported_settings_name_the_node(attrs, message):
    nodes, inits = _single("LSTM", **attrs)
    with pytest.raises(MultisalError, match=message):
        run_gradient(make_model(nodes, (1, T, I), (1, H), inits, opset=14), RNG.standard_normal((1, T, I)), [0])


def test_weights_that_depend_on_the_input_are_refused():
    nodes, inits = _single("GRU", weights="Ws")
    nodes = [helper.make_node("ReduceMean", ["x"], ["s"], keepdims=1), helper.make_node("Mul", ["W", "s"], ["Ws"])] + nodes
    with pytest.raises(MultisalError, match="rnn.*W"):
        run_gradient(make_model(nodes, (1, T, I), (1, H), inits, opset=14), RNG.standard_normal((1, T, I)), [0])


# ---- torch's exports ----------------------------------------------------------------------------------
torch = pytest.importorskip("torch")


class Recurrent(torch.nn.Module):
    """nn.LSTM / nn.GRU on (N, C, L) read as batch-first sequences, then a linear head; with two
    layers, or one bidirectional (timm's sequencer2d runs a batch-first bidirectional LSTM)."""

    def __init__(self, cls, **kwargs):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.rnn = cls(I, H, batch_first=True, **kwargs)
        for param in self.rnn.parameters():
            param.data = torch.randn(param.shape, generator=gen) * 0.5
        self.head = torch.nn.Linear(T * H * (2 if kwargs.get("bidirectional") else 1), 3)

    def forward(self, x):
        return self.head(self.rnn(x.transpose(1, 2))[0].flatten(1))


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("cls, kwargs", [(torch.nn.LSTM, {"bidirectional": True}), (torch.nn.GRU, {"num_layers": 2})],
                         ids=["lstm-bidirectional", "gru-2-layers"])
def test_torch_exports_against_autograd(cls, kwargs, dynamo, tmp_path):
    net = Recurrent(cls, **kwargs).eval()
    path = tmp_path / "rnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(B, I, T),), str(path), dynamo=dynamo, input_names=["x"],
                          output_names=["y"])
    model = onnx.load(str(path))
    assert cls.__name__.replace("nn.", "") in {n.op_type for n in model.graph.node}
    x = RNG.standard_normal((B, I, T)).astype(np.float32)
    values, _ = run_gradient(model, x, [0, 2])
    xt = torch.from_numpy(x).requires_grad_(True)
    (expected,) = torch.autograd.grad(net(xt)[[0, 1], [0, 2]].sum(), xt)
    assert_agree(values[grad_name("x")], expected.numpy(), tol=1e-5)
