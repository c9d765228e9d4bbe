"""Gradient rules of the recurrent layers LSTM and GRU: backpropagation through time, written as
two ONNX Scans per direction.

The node's outputs hold the hidden states H_t but neither the gates nor (LSTM) the cell states
C_t that the backward pass needs, so a first Scan runs the cell again in the node's direction and
stacks them per step; a second Scan walks the steps the other way, carrying dH (and dC), and
stacks the gradient of each step's gate pre-activations dG_t. dX = dG W for all steps at once,
and the carried values at the end are the initial states' gradients. The input's share of the
pre-activations, X W^T plus the biases, is one MatMul over all steps before the first Scan.

sequence_lens: steps t >= a sequence's length leave its state as it is and write Y_t = 0, as
onnxruntime runs them; a step mask m_t carries that through both Scans. It holds in the reverse
direction too, whose steps past a sequence's end come first and keep the initial state.
Gate orders are ONNX's: LSTM i, o, f, c (peepholes i, o, f); GRU z, r, h. Sequences are (T, B, I),
layout 0: onnxruntime runs no other (torch exports batch_first as Transposes around a layout-0
node). Cell clipping, input_forget and activations other than Sigmoid, Tanh and Relu are refused;
gradients of weights are never formed.
"""
from __future__ import annotations

import contextlib

import numpy as np

from multisal.errors import MultisalError
from multisal.frameworks import lazy_import

from ..context import FLOAT, INT64, node_label, rule

helper = lazy_import("onnx.helper")
numpy_helper = lazy_import("onnx.numpy_helper")

# f'(x) written from y = f(x), per activation a recurrent node may name.
DERIVATIVES = {
    "Sigmoid": lambda ctx, y: ctx.emit("Mul", [y, ctx.emit("Sub", [ctx.const(1.0), y])]),
    "Tanh": lambda ctx, y: ctx.emit("Sub", [ctx.const(1.0), ctx.emit("Mul", [y, y])]),
    "Relu": lambda ctx, y: ctx.positive(y),
}
# Weights, recurrence weights, biases and peepholes: never differentiated.
WEIGHT_INPUTS = {1: "W", 2: "R", 3: "B", 7: "P"}


class Body:
    """A Scan body being written: inside `with body.writing():` what ctx emits goes into it. Its
    inputs are states then per-step slices, its outputs states then per-step values; it reads the
    outer graph's tensors (weights, constants) by name."""

    def __init__(self, ctx, elem_type):
        self.ctx, self.elem_type = ctx, elem_type
        self.states, self.scans = [], []   # (inner name, outer name) pairs
        self.nodes = []

    def _input(self, kind, outer, into):
        # GradContext names what it writes <scope>/<kind>_<k>; body inputs are named the same way.
        inner = self.ctx._name(kind)
        into.append((inner, outer))
        return inner

    def state(self, outer):
        return self._input("state", outer, self.states)

    def step(self, outer):
        """The slice at the current step of `outer`, a sequence (T, ...)."""
        return self._input("step", outer, self.scans)

    @contextlib.contextmanager
    def writing(self):
        outer = self.ctx.nodes
        self.ctx.nodes = self.nodes
        try:
            yield
        finally:
            self.ctx.nodes = outer

    def scan(self, new_states, per_step, reverse):
        """Emits the Scan; returns its final states and stacked per-step outputs, in time order."""
        ctx = self.ctx
        per_step = [self._fresh(name) for name in per_step]

        def info(name):
            return helper.make_tensor_value_info(name, self.elem_type, None)

        graph = helper.make_graph(self.nodes, ctx._name("body"), [info(i) for i, _ in self.states + self.scans],
                                  [info(o) for o in list(new_states) + per_step])
        direction = 1 if reverse else 0
        outputs = ctx.emit("Scan", [o for _, o in self.states + self.scans], outputs=len(new_states) + len(per_step),
                           body=graph, num_scan_inputs=len(self.scans),
                           scan_input_directions=[direction] * len(self.scans),
                           scan_output_directions=[direction] * len(per_step))
        return outputs[:len(new_states)], outputs[len(new_states):]

    def _fresh(self, name):
        """A body output must be written in the body: a body input passed through gets an Identity."""
        if any(name == inner for inner, _ in self.states + self.scans):
            with self.writing():
                return self.ctx.emit("Identity", [name])
        return name


def _settings(ctx, node, per_direction, defaults):
    """(activation names per direction, hidden size), refusing what the rules do not cover."""
    directions = 2 if ctx.attr(node, "direction", "forward") == "bidirectional" else 1
    names = list(ctx.attr(node, "activations") or defaults * directions)
    canonical = {n.lower(): n for n in DERIVATIVES}
    if len(names) != per_direction * directions or any(n.lower() not in canonical for n in names):
        raise MultisalError(f"{node.op_type} node {node_label(node)!r}: no gradient for activations {names} "
                            f"(supported: {', '.join(DERIVATIVES)})")
    names = [canonical[n.lower()] for n in names]
    for attribute in ("clip", "input_forget"):
        if ctx.attr(node, attribute):
            raise MultisalError(f"{node.op_type} node {node_label(node)!r}: no gradient with {attribute} set")
    if ctx.opset < 9:
        raise MultisalError(f"{node.op_type} node {node_label(node)!r}: opset {ctx.opset}; the gradient's Scan "
                            "needs opset 9 or later")
    for i, what in WEIGHT_INPUTS.items():
        if ctx.needs(node, i):
            raise MultisalError(f"{node.op_type} node {node_label(node)!r}: its {what} ({node.input[i]!r}) depends "
                                "on the differentiated tensors; only X and the initial states get gradients")
    return [names[d * per_direction:(d + 1) * per_direction] for d in range(directions)], \
        int(ctx.attr(node, "hidden_size"))


def _input(node, i):
    return node.input[i] if len(node.input) > i and node.input[i] else None


def _pick(ctx, name, index, axis):
    """name[index] along axis (that axis dropped), or None for no tensor."""
    return None if name is None else ctx.emit("Gather", [name, ctx.int64s(index)], axis=axis)


def _cols(ctx, name, k, size):
    """The k-th block of `size` columns of a (..., n * size) tensor."""
    return ctx.slice(name, [-1], [k * size], [(k + 1) * size])


def _gate(ctx, activation, pre):
    return ctx.emit(activation, [pre])


def _times(ctx, *names):
    out = names[0]
    for name in names[1:]:
        out = ctx.emit("Mul", [out, name])
    return out


def _recurrent(ctx, node, dys, per_direction, defaults, direction_rule):
    """What LSTM and GRU share: masks, directions, the input's pre-activations and the
    gradients of X and the initial states; direction_rule writes one direction's Scans."""
    activations, hidden = _settings(ctx, node, per_direction, defaults)
    x = node.input[0]
    if int(ctx.attr(node, "layout", 0)):   # onnxruntime refuses such a node before any rule sees it
        raise MultisalError(f"{node.op_type} node {node_label(node)!r}: no gradient for layout=1 (batch first)")
    states_in = [_input(node, 5), _input(node, 6) if node.op_type == "LSTM" else None]
    dys = list(dys) + [None] * (3 - len(dys))
    dy, dstates = dys[0], dys[1:3]
    steps = ctx.shape(x)[0]
    mask = None
    if _input(node, 4):
        lengths = ctx.emit("Cast", [node.input[4]], to=INT64)                                    # (B,)
        running = ctx.emit("Less", [ctx.int64s(np.arange(steps).reshape(steps, 1)), lengths])     # (T, B)
        mask = ctx.unsqueeze(ctx.mask(running), [2])                                              # (T, B, 1)
    shape = ctx.emit("Shape", [x])
    zero = numpy_helper.from_array(np.zeros(1, dtype=ctx.np_dtype(node.input[0])))
    zeros = ctx.emit("ConstantOfShape", [ctx.emit("Concat", [ctx.slice(shape, [0], [1], [2]), ctx.int64s([hidden])],
                                                 axis=0)], value=zero)                              # (B, H)
    w, r, b = node.input[1], node.input[2], _input(node, 3)
    p = _input(node, 7)
    direction = ctx.attr(node, "direction", "forward")
    dxs, dinitial = [], [[], []]
    for d, names in enumerate(activations):
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        w_d, r_d = _pick(ctx, w, d, 0), _pick(ctx, r, d, 0)
        bias = _pick(ctx, b, d, 0)
        xw = ctx.emit("MatMul", [x, ctx.emit("Transpose", [w_d], perm=[1, 0])])                    # (T, B, G*H)
        initial = [_pick(ctx, s, d, 0) or zeros for s in states_in[:1 if node.op_type == "GRU" else 2]]
        dfinal = [_pick(ctx, s, d, 0) or zeros for s in dstates[:len(initial)]]
        dg, dstart = direction_rule(ctx, node, names, hidden, xw, bias, r_d, _pick(ctx, p, d, 0), initial,
                                    _pick(ctx, dy, d, 1), dfinal, mask, reverse)
        dxs.append(ctx.emit("MatMul", [dg, w_d]))                                                  # (T, B, I)
        for k, dstate in enumerate(dstart):
            dinitial[k].append(ctx.unsqueeze(dstate, [0]))
    dx = ctx.add_all(dxs)
    grads = [dx] + [None] * (len(node.input) - 1)
    for k, i in enumerate((5, 6)):
        if ctx.needs(node, i):
            dstate = dinitial[k][0] if len(dinitial[k]) == 1 else ctx.emit("Concat", dinitial[k], axis=0)
            grads[i] = dstate
    return grads


def _masked(ctx, new, old, m):
    """old + m (new - old): the new state where the step runs, the old one past a sequence's end."""
    return new if m is None else ctx.emit("Add", [old, ctx.emit("Mul", [m, ctx.emit("Sub", [new, old])])])


def _carry(ctx, step_grad, total, m):
    """A state's gradient before the step: through the step where it ran, straight through past a
    sequence's end: step_grad + (1 - m) total."""
    if m is None:
        return step_grad
    return ctx.emit("Add", [step_grad, ctx.emit("Mul", [ctx.emit("Sub", [ctx.const(1.0), m]), total])])


def _lstm_direction(ctx, node, acts, hidden, xw, bias, r, p, initial, dy, dfinal, mask, reverse):
    """One direction of an LSTM:
    i = f(G_i), f_t = f(G_f), c~ = g(G_c), C_t = f_t C_{t-1} + i c~, o = f(G_o), H_t = o h(C_t),
    G = X W^T + H_{t-1} R^T + Wb + Rb (+ P_i C_{t-1}, P_f C_{t-1}, P_o C_t). Backward, with dH_t
    = dY_t + the carried dH and dC_t = the carried dC + dH_t o h'(C_t):
    dG_o = dH_t h(C_t) f'(o), dG_i = dC_t c~ f'(i), dG_f = dC_t C_{t-1} f'(f_t),
    dG_c = dC_t i g'(c~), dH_{t-1} = dG R, dC_{t-1} = dC_t f_t (+ peephole terms)."""
    f_act, g_act, h_act = acts
    H = hidden
    if bias is not None:
        xw = ctx.emit("Add", [xw, ctx.emit("Add", [ctx.slice(bias, [0], [0], [4 * H]),
                                                   ctx.slice(bias, [0], [4 * H], [8 * H])])])
    peep = [ctx.slice(p, [0], [k * H], [(k + 1) * H]) for k in range(3)] if p is not None else None   # i, o, f
    r_t = ctx.emit("Transpose", [r], perm=[1, 0])
    elem = ctx.dtypes.get(node.input[0], FLOAT)

    forward = Body(ctx, elem)
    h, c = forward.state(initial[0]), forward.state(initial[1])
    g_x = forward.step(xw)
    m = forward.step(mask) if mask is not None else None
    with forward.writing():
        g = ctx.emit("Add", [g_x, ctx.emit("MatMul", [h, r_t])])
        gi, go, gf, gc = (_cols(ctx, g, k, H) for k in range(4))
        if peep:
            gi = ctx.emit("Add", [gi, ctx.emit("Mul", [peep[0], c])])
            gf = ctx.emit("Add", [gf, ctx.emit("Mul", [peep[2], c])])
        i, f, cc = _gate(ctx, f_act, gi), _gate(ctx, f_act, gf), _gate(ctx, g_act, gc)
        c_new = ctx.emit("Add", [ctx.emit("Mul", [f, c]), ctx.emit("Mul", [i, cc])])
        if peep:
            go = ctx.emit("Add", [go, ctx.emit("Mul", [peep[1], c_new])])
        o = _gate(ctx, f_act, go)
        hc = _gate(ctx, h_act, c_new)
        h_new = ctx.emit("Mul", [o, hc])
        states = [_masked(ctx, h_new, h, m), _masked(ctx, c_new, c, m)]
    _, (i_s, o_s, f_s, cc_s, cp_s, hc_s) = forward.scan(states, [i, o, f, cc, c, hc], reverse)

    backward = Body(ctx, elem)
    dh, dc = backward.state(dfinal[0]), backward.state(dfinal[1])
    dy_t = backward.step(dy) if dy is not None else None
    i, o, f, cc, cp, hc = (backward.step(s) for s in (i_s, o_s, f_s, cc_s, cp_s, hc_s))
    m = backward.step(mask) if mask is not None else None
    with backward.writing():
        if dy_t is not None:
            dh = ctx.emit("Add", [dh, dy_t if m is None else ctx.emit("Mul", [dy_t, m])])
        dhs, dcs = (d if m is None else ctx.emit("Mul", [d, m]) for d in (dh, dc))
        dct = ctx.emit("Add", [dcs, _times(ctx, dhs, o, DERIVATIVES[h_act](ctx, hc))])
        dgo = _times(ctx, dhs, hc, DERIVATIVES[f_act](ctx, o))
        if peep:
            dct = ctx.emit("Add", [dct, ctx.emit("Mul", [dgo, peep[1]])])
        dgi = _times(ctx, dct, cc, DERIVATIVES[f_act](ctx, i))
        dgf = _times(ctx, dct, cp, DERIVATIVES[f_act](ctx, f))
        dgc = _times(ctx, dct, i, DERIVATIVES[g_act](ctx, cc))
        dg = ctx.emit("Concat", [dgi, dgo, dgf, dgc], axis=-1)
        dc_prev = ctx.emit("Mul", [dct, f])
        if peep:
            dc_prev = ctx.add_all([dc_prev, ctx.emit("Mul", [dgi, peep[0]]), ctx.emit("Mul", [dgf, peep[2]])])
        states = [_carry(ctx, ctx.emit("MatMul", [dg, r]), dh, m), _carry(ctx, dc_prev, dc, m)]
    dstart, (dg_s,) = backward.scan(states, [dg], not reverse)
    return dg_s, dstart


def _gru_direction(ctx, node, acts, hidden, xw, bias, r, p, initial, dy, dfinal, mask, reverse):
    """One direction of a GRU: z = f(G_z), r = f(G_r), H_t = (1 - z) n + z H_{t-1} with
    n = g(X W_h^T + (r H_{t-1}) R_h^T + Rb_h + Wb_h), or with linear_before_reset
    n = g(X W_h^T + r u + Wb_h), u = H_{t-1} R_h^T + Rb_h. Backward, dH_t = dY_t + the carried dH:
    dG_z = dH_t (H_{t-1} - n) f'(z), dG_n = dH_t (1 - z) g'(n), and dG_r, dH_{t-1} through the
    reset product of the form in use."""
    f_act, g_act = acts
    H = hidden
    before_reset = int(ctx.attr(node, "linear_before_reset", 0))
    rb_h = None
    if bias is not None:
        wb, rb = ctx.slice(bias, [0], [0], [3 * H]), ctx.slice(bias, [0], [3 * H], [6 * H])
        if before_reset:   # R_h's bias is inside the reset product: add only z's and r's here
            rb_h = ctx.slice(rb, [0], [2 * H], [3 * H])
            rb = ctx.pad(ctx.slice(rb, [0], [0], [2 * H]), 1, {0: (0, H)})
        xw = ctx.emit("Add", [xw, ctx.emit("Add", [wb, rb])])
    r_zr, r_h = ctx.slice(r, [0], [0], [2 * H]), ctx.slice(r, [0], [2 * H], [3 * H])
    r_zr_t, r_h_t = (ctx.emit("Transpose", [w], perm=[1, 0]) for w in (r_zr, r_h))
    elem = ctx.dtypes.get(node.input[0], FLOAT)

    forward = Body(ctx, elem)
    h = forward.state(initial[0])
    g_x = forward.step(xw)
    m = forward.step(mask) if mask is not None else None
    with forward.writing():
        hr = ctx.emit("MatMul", [h, r_zr_t])
        z = _gate(ctx, f_act, ctx.emit("Add", [_cols(ctx, g_x, 0, H), _cols(ctx, hr, 0, H)]))
        rr = _gate(ctx, f_act, ctx.emit("Add", [_cols(ctx, g_x, 1, H), _cols(ctx, hr, 1, H)]))
        if before_reset:
            u = ctx.emit("MatMul", [h, r_h_t])
            u = u if rb_h is None else ctx.emit("Add", [u, rb_h])
            n = _gate(ctx, g_act, ctx.emit("Add", [_cols(ctx, g_x, 2, H), ctx.emit("Mul", [rr, u])]))
        else:
            n = _gate(ctx, g_act, ctx.emit("Add", [_cols(ctx, g_x, 2, H),
                                                   ctx.emit("MatMul", [ctx.emit("Mul", [rr, h]), r_h_t])]))
        h_new = ctx.emit("Add", [n, ctx.emit("Mul", [z, ctx.emit("Sub", [h, n])])])
        states = [_masked(ctx, h_new, h, m)]
    _, stacked = forward.scan(states, [z, rr, n, h] + ([u] if before_reset else []), reverse)

    backward = Body(ctx, elem)
    dh = backward.state(dfinal[0])
    dy_t = backward.step(dy) if dy is not None else None
    z, rr, n, hp = (backward.step(s) for s in stacked[:4])
    u = backward.step(stacked[4]) if before_reset else None
    m = backward.step(mask) if mask is not None else None
    with backward.writing():
        if dy_t is not None:
            dh = ctx.emit("Add", [dh, dy_t if m is None else ctx.emit("Mul", [dy_t, m])])
        dhs = dh if m is None else ctx.emit("Mul", [dh, m])
        dgz = _times(ctx, dhs, ctx.emit("Sub", [hp, n]), DERIVATIVES[f_act](ctx, z))
        dgn = _times(ctx, dhs, ctx.emit("Sub", [ctx.const(1.0), z]), DERIVATIVES[g_act](ctx, n))
        if before_reset:
            dgr = _times(ctx, dgn, u, DERIVATIVES[f_act](ctx, rr))
            dh_n = ctx.emit("MatMul", [ctx.emit("Mul", [dgn, rr]), r_h])
        else:
            drh = ctx.emit("MatMul", [dgn, r_h])
            dgr = _times(ctx, drh, hp, DERIVATIVES[f_act](ctx, rr))
            dh_n = ctx.emit("Mul", [drh, rr])
        dh_prev = ctx.add_all([ctx.emit("Mul", [dhs, z]),
                               ctx.emit("MatMul", [ctx.emit("Concat", [dgz, dgr], axis=-1), r_zr]), dh_n])
        dg = ctx.emit("Concat", [dgz, dgr, dgn], axis=-1)
        states = [_carry(ctx, dh_prev, dh, m)]
    dstart, (dg_s,) = backward.scan(states, [dg], not reverse)
    return dg_s, dstart


@rule("LSTM")
def lstm(ctx, node, dys):
    return _recurrent(ctx, node, dys, 3, ["Sigmoid", "Tanh", "Tanh"], _lstm_direction)


@rule("GRU")
def gru(ctx, node, dys):
    return _recurrent(ctx, node, dys, 2, ["Sigmoid", "Tanh"], _gru_direction)
