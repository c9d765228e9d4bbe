"""`multisal explain --evaluate` and `multisal evaluate RUN_DIR`: the scores of every map and of the
baselines, in the manifest and in index.html (a table per image, a summary over the run, the best
per column marked), the same whether scored with the run or afterwards from its folder; bad
input said in one line before anything is written."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import multisal as ms
import tiny_models
from multisal.app.cli import main
from multisal.app.score_tables import image_table, summary_table

TINY = ["--model", "tiny_models:classifier", "--preset", "raw", "--size", "32", "32"]
METRICS = "deletion,sparseness,random_logit"


def _manifest(out):
    return [json.loads(line) for line in (Path(out) / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of two photos and two methods, scored with the run."""
    folder = tmp_path_factory.mktemp("evaluate")
    photos = []
    for seed, name in enumerate(("one.png", "two.png")):
        rgb = np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8)
        assert cv2.imwrite(str(folder / name), rgb[:, :, ::-1])
        photos.append(str(folder / name))
    out = folder / "run"
    assert main(["explain", *photos, *TINY, "--method", "gradcam,vanilla_gradient", "--out", str(out),
                 "--evaluate", "--metrics", METRICS]) == 0
    return out, photos


def test_explain_evaluate_records_every_map_and_baseline(run, capsys):
    out, photos = run
    records = _manifest(out)
    assert [r["input"] for r in records] == photos
    for r in records:
        assert list(r["evaluation"]) == ["gradcam", "vanilla_gradient", "random", "sobel"]
        for scores in r["evaluation"].values():
            assert list(scores) == METRICS.split(",")
            assert all(isinstance(v, float) and np.isfinite(v) for v in scores.values())
    # The scores are ms.evaluate's on the saved maps and the class the run explained.
    be = ms.load_backend("torch", model=tiny_models.classifier(), preset="raw")
    x = ms.get_preset("raw").apply(photos[0], size=(32, 32))
    maps = {name: np.load(out / records[0]["folder"] / f"{name}.npy")[None] for name in ("gradcam", "vanilla_gradient")}
    expected = ms.evaluate(be, x, maps, metrics=METRICS.split(","), target=records[0]["target"], baselines=True)
    for name, scores in expected.items():
        for metric, value in scores.items():
            assert records[0]["evaluation"][name][metric] == pytest.approx(float(value[0]), abs=1e-9), (name, metric)
    page = (out / "index.html").read_text()
    assert page.count('<table class="scores">') == 3          # one per image, one summary
    assert "Evaluation over the run" in page and 'class="best"' in page


def test_evaluate_a_finished_run_again_gives_the_same_scores(run, capsys):
    out, _ = run
    before = _manifest(out)
    assert main(["evaluate", str(out), "--metrics", METRICS]) == 0
    assert capsys.readouterr().out.strip() == f"2 inputs evaluated; report: {out / 'index.html'}"
    after = _manifest(out)
    assert [r["evaluation"] for r in after] == [r["evaluation"] for r in before]


def test_tables_mark_the_best_per_column_and_escape_names():
    records = [{"status": "ok", "evaluation": {"<b>m</b>": {"deletion": 0.2, "insertion": 0.9},
                                               "random": {"deletion": 0.5, "insertion": 0.4, "bogus": 1.0},
                                               "edited": {"deletion": "NaN"}}},
               {"status": "ok", "evaluation": {"<b>m</b>": {"deletion": 0.4, "insertion": 0.7},
                                               "random": {"deletion": 0.3, "insertion": 0.5}}}]
    table = image_table(records[0])
    assert "&lt;b&gt;m&lt;/b&gt;" in table and "<b>m</b>" not in table and "bogus" not in table and "edited" not in table
    # Deletion: lower is better (0.2 of the method); insertion: higher (0.9 of the method).
    assert table.count('class="best"') == 2 and '<td class="best">0.2000</td>' in table
    summary = summary_table(records)
    # Over the run the method's means are the best: deletion 0.3 (random's 0.4), insertion 0.8.
    assert '<td class="best">0.3000 ± 0.1000</td>' in summary and '<td class="best">0.8000 ± 0.1000</td>' in summary
    assert summary.count('class="best"') == 2


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "{tmp}"], "multisal: error: run folder '{tmp}' holds no config.toml: expected the output folder "
                            "of a finished `multisal explain` or `multisal batch`"),
    (["evaluate", "{tmp}/nowhere"], "multisal: error: run folder '{tmp}/nowhere' is not a folder"),
    (["evaluate", "{tmp}", "--metrics", "deletoin"], "multisal: error: unknown metric 'deletoin': expected one of "
                                                     "deletion, insertion, road_morf, road_lerf, randomization, "
                                                     "random_logit, sparseness, complexity"),
    (["explain", "skimage:chelsea", *TINY, "--out", "{tmp}/run", "--evaluate", "--metrics", "nope"],
     "multisal: error: unknown metric 'nope': expected one of "),
    (["explain", "skimage:chelsea", *TINY, "--out", "{tmp}/run", "--metrics", "deletion"],
     "multisal: error: --metrics goes with --evaluate"),
])
def test_bad_input_is_one_line_before_anything_is_written(tmp_path, capsys, argv, message):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.replace("{tmp}", str(tmp_path))) and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_evaluate_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "RUN_DIR" in text and "example: multisal evaluate out/pets" in text
