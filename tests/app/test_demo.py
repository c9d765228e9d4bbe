"""The demo's showcase (the README's pictures): per photo, the photo and one map of each kind of
SHOWCASE, each drawn from the run's .npy by its convention with its colour bar."""
import cv2
import numpy as np

from multisal.app.demo import SHOWCASE, showcase
from multisal.app.render import BAND, BAR, overlay
from multisal.app.runs import run_explain
from multisal.pictures import views


def test_showcase_draws_each_kind_by_its_convention(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    assert cv2.imwrite(str(tmp_path / "photo.png"), rgb)
    methods = sorted({name for name, _, _ in SHOWCASE})
    run = run_explain({"backend": "torch", "model": "tiny_models:classifier", "preset": "raw", "size": [32, 32],
                       "inputs": [str(tmp_path / "photo.png")], "output": str(tmp_path / "out"), "methods": methods,
                       "target": 0, "smoothgrad": {"n": 2}, "integrated_gradients": {"steps": 2},
                       "rise": {"n_masks": 8}})
    assert not run.failed
    files = showcase(run, tmp_path / "demo", cell=64)
    assert [str(f) for f in files] == ["showcase-photo.png"]
    picture = cv2.cvtColor(cv2.imread(str(tmp_path / "demo" / files[0])), cv2.COLOR_BGR2RGB)
    assert picture.shape == (BAND + 64 + BAR, 64 * (1 + len(SHOWCASE)), 3)
    folder = run.output / run.records[0]["folder"]
    photo = cv2.cvtColor(cv2.imread(str(folder / "input.png")), cv2.COLOR_BGR2RGB)
    cells = [picture[BAND:BAND + 64, 64 * i:64 * (i + 1)].astype(int) for i in range(1 + len(SHOWCASE))]
    for cell, (name, options, _) in zip(cells[1:], SHOWCASE):
        m = np.load(folder / f"{name}.npy")
        expected = views({name: m}, **options)[name].draw(m, photo)
        assert np.abs(cell - cv2.resize(expected, (64, 64), interpolation=cv2.INTER_AREA)).mean() < 1, name
    grey = cells[1 + [options for _, options, _ in SHOWCASE].index({"style": "map"})]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    # The run's own picture of a method is the one the showcase draws with its defaults.
    run_png = cv2.cvtColor(cv2.imread(str(folder / "gradcam_pp.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(run_png, overlay(photo, np.load(folder / "gradcam_pp.npy"), "gradcam_pp")[0])
