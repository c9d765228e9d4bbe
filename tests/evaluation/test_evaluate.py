"""ms.evaluate as a user calls it: what it returns, that its batches do not change its scores,
the trivial baselines, and bad input said in one line naming it."""
import doctest

import numpy as np
import pytest
import torch

import multisal as ms


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    be = ms.load_backend("torch", model=net, preset="raw")
    x = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    return be, x, {"vanilla_gradient": ms.vanilla_gradient(be, x), "gradcam": ms.gradcam(be, x)}


def test_every_metric_on_methods_and_baselines(setup):
    be, x, maps = setup
    scores = ms.evaluate(be, x, maps, baselines=True, step=32, percentages=(30, 70), randomization_steps=2)
    assert list(scores) == ["vanilla_gradient", "gradcam", "random", "sobel"]
    for name, by_metric in scores.items():
        assert list(by_metric) == list(ms.METRICS), name
        for metric, value in by_metric.items():
            assert value.shape == (2,) and value.dtype == np.float64 and np.isfinite(value).all(), (name, metric)
    # Maps that ignore the model pass the randomisation check perfectly, i.e. they fail it.
    np.testing.assert_allclose(scores["sobel"]["randomization"], 1.0)
    np.testing.assert_allclose(scores["random"]["random_logit"], 1.0)
    assert scores["vanilla_gradient"]["randomization"].max() < 0.99


def test_an_attribution_per_channel_is_scored_by_its_largest_magnitude(setup):
    be, x, _ = setup
    ig = ms.integrated_gradients(be, x, steps=4)
    assert ig.shape == (2, 3, 16, 16)
    ours = ms.evaluate(be, x, {"integrated_gradients": ig}, metrics=["sparseness", "random_logit"],
                       method_options={"integrated_gradients": {"steps": 4}})["integrated_gradients"]
    expected = ms.evaluate(be, x, np.abs(ig).max(axis=1), metrics=["sparseness"])["map"]["sparseness"]
    np.testing.assert_allclose(ours["sparseness"], expected)
    assert np.isfinite(ours["random_logit"]).all()


def test_batch_size_does_not_change_the_scores(setup):
    be, x, maps = setup
    metrics = ["deletion", "insertion", "road_morf", "road_lerf"]
    one = ms.evaluate(be, x, maps, metrics=metrics, step=40, percentages=(50,), batch_size=1)
    many = ms.evaluate(be, x, maps, metrics=metrics, step=40, percentages=(50,))
    for name in maps:
        for metric in metrics:
            np.testing.assert_allclose(one[name][metric], many[name][metric], atol=1e-6)


def test_sobel_baseline_is_the_gradient_magnitude_of_a_ramp(setup):
    be, _, _ = setup
    ramp = np.broadcast_to(np.arange(16, dtype=np.float32) * 0.5, (1, 3, 16, 16)).copy()
    edges = ms.evaluation.sobel_map(be, ramp)[0]
    np.testing.assert_allclose(edges[:, 1:-1], 8 * 0.5)     # (1 + 2 + 1) x 2 x slope, columns inside
    np.testing.assert_allclose(edges[:, [0, -1]], 4 * 0.5)  # an edge column repeated: half the span


@pytest.mark.parametrize("call, message", [
    (lambda be, x, m: ms.evaluate(be, x, {"gradcam": m["gradcam"][:, :8]}),
     "map 'gradcam' has shape (2, 8, 16), expected (2, 16, 16) (one map per input, at the inputs' height and width "
     "(16, 16))"),
    (lambda be, x, m: ms.evaluate(be, x, m["gradcam"][:1]), "map 'map' has shape (1, 16, 16), expected (2, 16, 16)"),
    (lambda be, x, m: ms.evaluate(be, x, {"g": m["gradcam"] * np.nan}), "map 'g' holds NaN or infinite values"),
    (lambda be, x, m: ms.evaluate(be, x, m, metrics=["deletoin"]), "unknown metric 'deletoin': expected one of "
     "deletion, insertion, road_morf, road_lerf, randomization, random_logit, sparseness, complexity"),
    (lambda be, x, m: ms.evaluate(be, x, m, metrics=[]), "no metric given"),
    (lambda be, x, m: ms.evaluate(be, x, m, metrics=["deletion"], step=257),
     "step=257: expected an integer >= 1 and <= 256"),
    (lambda be, x, m: ms.evaluate(be, x, m, metrics=["road_morf"], percentages=(0, 50)),
     "percentages=(0, 50): expected numbers strictly between 0 and 100"),
    (lambda be, x, m: ms.evaluate(be, x, {"mine": m["gradcam"]}, metrics=["random_logit"]),
     "map 'mine': the sanity checks make the map again and 'mine' is no method (ms.METHODS): give explain="),
    (lambda be, x, m: ms.evaluate(be, x, {"occlusion": m["gradcam"]}, metrics=["random_logit"],
                                  method_options={"occlusion": {"window": (3, 20, 20)}}),
     "window (3, 20, 20) is larger than the image (3, 16, 16) (channels, height, width)"),
    (lambda be, x, m: ms.evaluate(be, x, {"sobel": m["gradcam"]}, baselines=True),
     "map 'sobel' is also the name of a baseline"),
    (lambda be, x, m: ms.evaluate(be, x, {}), "maps holds no map"),
    (lambda be, x, m: ms.evaluate(be, x, m, target=9, metrics=["deletion"]), "target "),
    (lambda be, x, m: ms.evaluate(be, x, m, target="argmax_per_sample"),
     "evaluate's target must be None, a class index or one per image, got 'argmax_per_sample'"),
])
def test_bad_input_is_one_line_naming_it(setup, call, message):
    be, x, maps = setup
    with pytest.raises(ms.MultisalError) as err:
        call(be, x, maps)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_docstring_example_runs():
    """evaluate's Example, under doctest with the set-up the methods' examples share."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    globs = {"ms": ms, "np": np, "be": ms.load_backend("torch", model=net, preset="raw"),
             "x": np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)}
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder(recurse=False).find(ms.evaluate, "ms.evaluate", globs=globs):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted == 2 and result.failed == 0
