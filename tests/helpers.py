"""Shared test helpers: DESIGN.md's "Numerical agreement" as one assertion, and central
differences."""
import numpy as np

# DESIGN.md: relative L2 error <= 1e-3 AND at most 0.1% of elements differing by more than
# 1e-3 of the largest magnitude. Pure formula checks (a CAM from given A and g) use tol=1e-5.
MAX_BAD_FRACTION = 1e-3


def agreement(actual, expected):
    """(relative L2 error, per-element errors relative to the largest magnitude) of actual vs expected."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    norm = np.linalg.norm(e.ravel())
    diff = np.linalg.norm((a - e).ravel())
    rel_l2 = diff / norm if norm > 0 else diff
    scale = max(np.abs(a).max(initial=0.0), np.abs(e).max(initial=0.0))
    elem = np.abs(a - e) / (scale if scale > 0 else 1.0)
    return rel_l2, elem


def agrees(actual, expected, tol=1e-3):
    rel_l2, elem = agreement(actual, expected)
    return rel_l2 <= tol and (elem > tol).mean() <= MAX_BAD_FRACTION


def assert_agree(actual, expected, tol=1e-3):
    """Fail unless actual agrees with expected in DESIGN.md's sense (tol=1e-5 for pure formulas)."""
    rel_l2, elem = agreement(actual, expected)
    bad = float((elem > tol).mean()) if elem.size else 0.0
    assert np.isfinite(rel_l2) and rel_l2 <= tol and bad <= MAX_BAD_FRACTION, (
        f"no agreement: relative L2 error {rel_l2:.3e} (limit {tol:g}), "
        f"{100 * bad:.3f}% of {elem.size} elements off by > {tol:g} of the largest magnitude "
        f"(limit {100 * MAX_BAD_FRACTION:g}%), worst {elem.max(initial=0.0):.3e}")


def central_differences(f, point, step):
    """d f / d point of a scalar function f of a float64 array, by central differences one element
    at a time."""
    point = np.asarray(point, dtype=np.float64)
    grad = np.zeros_like(point)
    for idx in np.ndindex(point.shape):
        up, down = point.copy(), point.copy()
        up[idx] += step
        down[idx] -= step
        grad[idx] = (f(up) - f(down)) / (2 * step)
    return grad
