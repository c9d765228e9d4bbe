"""The conventions pictures are drawn by (multisal.pictures), against references written here or
taken from other libraries: PAIR saliency's VisualizeImageGrayscale and VisualizeImageDiverging
(their formulas, written in the test), matplotlib's RdBu_r, pytorch-grad-cam's show_cam_on_image;
then ms.show's figure, the PNG grid's colour bar and the one-line errors."""
import doctest
import re

import matplotlib
import numpy as np
import pytest
from pytorch_grad_cam.utils.image import show_cam_on_image

import multisal as ms
from multisal import pictures
from multisal.app import render

rng = np.random.default_rng(0)
PHOTO = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def pair_grayscale(image_3d, percentile=99):
    """PAIR saliency's VisualizeImageGrayscale (saliency/core/visualization.py)."""
    image_2d = np.sum(np.abs(image_3d), axis=2)
    vmax = np.percentile(image_2d, percentile)
    vmin = np.min(image_2d)
    return np.clip((image_2d - vmin) / (vmax - vmin), 0, 1)


def pair_diverging_symmetric(image_3d, percentile=99):
    """PAIR's VisualizeImageDiverging, centred at zero, with the span taken from |m| (the
    percentile of the signed values, as PAIR takes it, is not symmetric about zero)."""
    image_2d = np.sum(image_3d, axis=2)
    span = np.percentile(np.abs(image_2d), percentile)
    return np.clip(image_2d / span, -1, 1)


def test_pixel_maps_are_clipped_at_the_99th_percentile_as_pair_draws_them():
    attribution = rng.standard_normal((3, 24, 32)) ** 3      # heavy tails: a few pixels dominate
    grey = ms.overlay(None, attribution, kind="pixel", style="map")
    expected = np.rint(255 * pair_grayscale(np.moveaxis(attribution, 0, -1)))
    assert np.abs(grey[..., 0].astype(int) - expected).max() <= 1
    assert (grey[..., 0] == 255).mean() == pytest.approx(0.01, abs=0.005)   # the top 1% saturate, no more
    # The gradient methods' names pick this convention; a CAM's name picks min-max scaling.
    assert np.array_equal(ms.overlay(None, attribution, method="smoothgrad", style="map", cmap="grey"), grey)
    cam_view = pictures.views({"gradcam": np.abs(attribution)})["gradcam"]
    assert (cam_view.kind, cam_view.high) == ("cam", np.abs(attribution).sum(axis=0).max())


def test_signed_maps_are_centred_at_zero_on_a_diverging_map():
    m = rng.standard_normal((24, 32))
    m[m > 0] *= 5                                             # positive side five times wider
    m[0, 0] = 0.0
    picture = ms.overlay(None, m, kind="signed", style="map")
    assert picture[0, 0].tolist() == [247, 247, 247]           # ColorBrewer RdBu's middle, for 0
    rdbu_r = matplotlib.colormaps["RdBu_r"]
    assert np.abs(255 * np.array(rdbu_r(0.5)[:3]) - 247).max() < 1.5    # matplotlib's, between two steps
    v = pair_diverging_symmetric(m[..., None])
    expected = 255 * rdbu_r((v + 1) / 2)[..., :3]
    assert np.abs(picture - expected).max() <= 4               # matplotlib's table has 256 steps
    # Min-max scaling (the old way) would have put 0 a sixth of the way up, in blue.
    assert pictures.map_kind(None, m) == "signed" and pictures.map_kind(None, np.abs(m)) == "pixel"


def test_signed_overlay_shows_the_photo_where_the_map_is_zero():
    m = np.zeros((24, 32))
    m[:4] = 1.0
    m[-4:] = -1.0
    out = ms.overlay(PHOTO, m, kind="signed", alpha=1.0)
    grey = np.rint(PHOTO @ [0.299, 0.587, 0.114])
    assert np.abs(out[8:16].astype(float) - grey[8:16, :, None]).max() <= 1
    red, blue = out[:4].reshape(-1, 3).mean(0), out[-4:].reshape(-1, 3).mean(0)
    assert red[0] > red[2] and blue[2] > blue[0]


def test_alpha_weighted_heat_map_over_the_photo():
    m = rng.random((24, 32))
    alpha = 0.8
    out = ms.overlay(PHOTO, m, kind="pixel", percentile=100, alpha=alpha, cmap="grey")
    v = (m - m.min()) / (m.max() - m.min())
    grey = PHOTO @ [0.299, 0.587, 0.114]
    expected = grey[..., None] * (1 - alpha * v[..., None]) + 255 * v[..., None] * alpha * v[..., None]
    assert np.abs(out - expected).max() <= 1


def test_cams_are_blended_like_pytorch_grad_cam():
    cam = rng.random((24, 32))
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    reference = show_cam_on_image(PHOTO / 255.0, cam.astype(np.float32), use_rgb=True, image_weight=0.5)
    ours = ms.overlay(PHOTO, cam, method="gradcam")
    # pytorch-grad-cam quantises the map to 256 levels before the colour map; jet moves by up to
    # 4 levels a step, halved by the blend.
    assert np.abs(ours.astype(int) - reference).max() <= 3


def test_maps_are_resized_to_the_photo():
    cam = np.zeros((6, 8))
    cam[:3] = 1.0
    out = ms.overlay(PHOTO, cam, method="gradcam")
    assert out.shape == PHOTO.shape


def test_shared_scale_gives_the_same_colour_to_the_same_value():
    a = rng.random((24, 32))
    b = 3 * rng.random((24, 32))
    a[5, 5] = b[5, 5] = 0.7
    maps = {"vanilla_gradient": a, "smoothgrad": b}
    shared = pictures.views(maps, shared=True)
    drawn = {name: view.draw(maps[name]) for name, view in shared.items()}
    assert shared["vanilla_gradient"].high == shared["smoothgrad"].high == np.percentile(np.r_[a.ravel(), b.ravel()], 99)
    assert drawn["vanilla_gradient"][5, 5].tolist() == drawn["smoothgrad"][5, 5].tolist()
    apart = pictures.views(maps)
    assert apart["vanilla_gradient"].draw(a)[5, 5].tolist() != apart["smoothgrad"].draw(b)[5, 5].tolist()
    # Kinds keep their own scales: a CAM beside them is not squashed by the gradients' range.
    mixed = pictures.views(dict(maps, gradcam=rng.random((24, 32))), shared=True)
    assert mixed["gradcam"].high <= 1 < mixed["smoothgrad"].high


def test_show_draws_the_photo_and_one_panel_per_method_with_colour_bars():
    maps = {"smoothgrad": rng.random((24, 32)), "gradcam": rng.random((6, 8)),
            "integrated_gradients": rng.standard_normal((3, 24, 32))}
    fig = ms.show(PHOTO, maps, kind={"integrated_gradients": "signed"}, shared=True)
    assert isinstance(fig, matplotlib.figure.Figure)
    panels = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["photo", *maps]
    assert np.array_equal(panels[0].images[0].get_array(), PHOTO)
    resolved = pictures.views(maps, kind={"integrated_gradients": "signed"}, shared=True)
    for ax, (name, view) in zip(panels[1:], resolved.items()):
        assert np.array_equal(ax.images[0].get_array(), view.draw(maps[name], PHOTO))
    bars = [ax for ax in fig.axes if not ax.get_title()]
    assert len(bars) == 3
    limits = sorted(tuple(round(x, 6) for x in ax.get_xlim()) for ax in bars)
    assert limits == sorted((round(v.low, 6), round(v.high, 6)) for v in resolved.values())
    assert resolved["integrated_gradients"].low == -resolved["integrated_gradients"].high
    fig = ms.show(PHOTO, [maps["smoothgrad"]], colorbar=False, columns=1)
    assert [ax.get_title() for ax in fig.axes] == ["photo", "map 0"]
    fig = ms.show(PHOTO, maps, titles={"gradcam": "Grad-CAM"}, columns=2)
    assert [ax.get_title() for ax in fig.axes if ax.images][:4] == ["photo", "smoothgrad", "Grad-CAM",
                                                                    "integrated_gradients"]


def test_grid_draws_the_colour_bar_under_each_map():
    m = rng.random((24, 32))
    picture, view = render.overlay(PHOTO, m, "smoothgrad")
    cell = 64
    grid = render.grid([("photo", PHOTO), ("smoothgrad", picture, view)], cell=cell)
    assert grid.shape == (render.BAND + cell + render.BAR, 2 * cell, 3)
    bar = grid[render.BAND + cell + 6, cell + 4:2 * cell - 4].astype(int)
    table = pictures.apply_colours(np.linspace(0, 1, cell - 8), view.table)
    assert np.abs(bar - table).max() <= 1
    assert (grid[render.BAND + cell:, :cell] == 255).all()    # no bar under the photo


@pytest.mark.parametrize("call, message", [
    (lambda: ms.overlay(PHOTO, np.ones((2, 2, 2, 2))), "map 'map': expected one image's (H,W) or (C,H,W) map"),
    (lambda: ms.overlay(PHOTO, np.full((4, 4), np.nan)), "map 'map': the map has NaN or infinite values"),
    (lambda: ms.overlay(PHOTO, np.ones((4, 4)), kind="cams"), "map 'map': kind 'cams': expected one of"),
    (lambda: ms.overlay(PHOTO, np.ones((4, 4)), percentile=0), "map 'map': percentile=0: expected"),
    (lambda: ms.overlay(PHOTO, np.ones((4, 4)), cmap="nope"), "cmap 'nope': expected grey, rdbu"),
    (lambda: ms.overlay(PHOTO - 128.0, np.ones((4, 4))), "image: expected uint8 or floats in [0, 1]"),
    (lambda: ms.show(PHOTO, {}), "maps: expected at least one map"),
])
def test_bad_input_is_one_line(call, message):
    with pytest.raises(ms.MultisalError, match="^" + re.escape(message)):
        call()


@pytest.mark.parametrize("function", [ms.overlay, ms.show])
def test_docstring_example_runs(function):
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(function, globs={"ms": ms, "np": np}):
        runner.run(test)
    assert runner.summarize(verbose=False).attempted > 0 and runner.summarize(verbose=False).failed == 0
