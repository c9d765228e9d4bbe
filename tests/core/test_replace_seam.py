"""Backend.run(..., replace=...), the seam's forward-only request with a layer's output given:
declared and checked once in multisal/backend.py, refused in one line by a backend that cannot."""
import numpy as np
import pytest

import multisal as ms


class TwoLayers(ms.Backend):
    """h = relu(W1 x), y = W2 h, in NumPy: layer "h" can be replaced."""
    name = "two-layers"

    def __init__(self, model=None, preset=None):
        rng = np.random.default_rng(0)
        self.W1, self.W2 = rng.standard_normal((6, 12)), rng.standard_normal((4, 6))
        self.calls = []

    def layer_names(self):
        return ["h"]

    def candidate_layers(self, sample_shape):
        return []

    def sample_bytes(self, sample_shape):
        return 1000

    def _hidden(self, x):
        return np.maximum(x.reshape(len(x), -1) @ self.W1.T, 0)

    def _run(self, x, objective, target, layers, input_grad):
        h = self._hidden(x)
        return ms.Result(outputs=h @ self.W2.T, activations={"h": h} if layers else {})

    def _run_replaced(self, x, replace):
        self.check_layers(replace)
        self.calls.append(len(x))
        return ms.Result(outputs=replace["h"] @ self.W2.T)


class NoReplace(TwoLayers):
    name = "no-replace"
    _run_replaced = ms.Backend._run_replaced


@pytest.fixture
def x():
    return np.random.default_rng(1).standard_normal((5, 3, 2, 2)).astype(np.float32)


def test_replace_runs_in_chunks_of_the_memory_budget(x):
    be = TwoLayers()
    be.memory_budget = 2000            # two samples a call
    h = np.random.default_rng(2).random((5, 6))
    assert np.allclose(be.run(x, replace={"h": h}).outputs, h @ be.W2.T)
    assert sorted(be.calls) == [1, 2, 2]
    assert be.replaces_layers and not NoReplace().replaces_layers


@pytest.mark.parametrize("kwargs, message", [
    (dict(replace={"h": np.zeros((5, 6))}, objective="logit", target=np.zeros(5, np.int64)),
     r"run\(..., replace=...\) is a forward pass only"),
    (dict(replace={"h": np.zeros((5, 6))}, layers=["h"]), "forward pass only"),
    (dict(replace={"g": np.zeros((5, 6))}), "unknown layer 'g' in two-layers: available: h"),
    (dict(replace={"h": np.zeros((4, 6))}), r"replace\['h'\] must be a float array with one row per input \(5\)"),
    (dict(replace={"h": np.zeros((5, 6), np.int64)}), r"replace\['h'\] must be a float array"),
    (dict(replace={}), "replace must map layer names to arrays"),
    (dict(replace={"h": np.full((5, 6), np.nan)}), r"replace\['h'\] holds NaN or infinite values"),
])
def test_bad_replace_requests_are_one_line(x, kwargs, message):
    with pytest.raises(ms.MultisalError, match=message) as info:
        TwoLayers().run(x, **kwargs)
    assert "\n" not in str(info.value)


def test_a_backend_that_cannot_replace_refuses_in_one_line(x):
    with pytest.raises(ms.MultisalError, match=r"backend 'no-replace' cannot replace a layer's output") as info:
        NoReplace().run(x, replace={"h": np.zeros((5, 6))})
    assert "\n" not in str(info.value)
    with pytest.raises(ms.MultisalError, match="cannot replace a layer's output"):
        ms.ablationcam(NoReplace(), x, layer="h")
