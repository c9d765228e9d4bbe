"""examples/explain.ipynb runs from top to bottom in a fresh kernel (nbclient), so it cannot rot:
no cell fails, every ms.show draws a picture, the ONNX maps agree with torch's, and the run shows
itself with its grid embedded. The notebook is kept without outputs."""
import base64
import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "explain.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("notebook")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    return nb, folder


def _outputs(cell, kind):
    return [o for o in cell.outputs if o.output_type in ("display_data", "execute_result") and kind in o.data]


def test_notebook_runs_and_draws_every_picture(executed):
    nb, folder = executed
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    shows = [cell for cell in code if "ms.show(" in cell.source]
    assert len(shows) == 4
    for cell in shows:
        png = _outputs(cell, "image/png")
        assert len(png) == 1, cell.source                       # drawn once, not twice
        assert base64.b64decode(png[0].data["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    printed = "".join(o.get("text", "") for cell in code for o in cell.outputs if o.output_type == "stream")
    assert "Egyptian cat" in printed or "tabby" in printed
    assert re.findall(r"^(\w+) +[\d.]+ s$", printed, flags=re.M)[:14] == [
        "vanilla_gradient", "smoothgrad", "integrated_gradients", "gradcam", "gradcam_pp", "smooth_gradcam_pp",
        "layercam", "xgradcam", "hirescam", "eigencam", "scorecam", "ablationcam", "occlusion", "rise"]
    differences = [float(d) for d in re.findall(r"relative L2 difference from torch: (\S+)", printed)]
    assert len(differences) == 3 and max(differences) < 1e-3   # the agreement bound of the backends
    # The scores table: every scored map and both baselines, each score a fraction in [0, 1].
    rows = dict((m.group(1), [float(v) for v in m.group(2).split()])
                for m in re.finditer(r"^(\w+) +((?:[01]\.\d{3} *){3})$", printed, flags=re.M))
    assert set(rows) == {"vanilla_gradient", "smoothgrad", "integrated_gradients", "gradcam", "gradcam_pp", "scorecam",
                         "rise", "random", "sobel"}
    assert rows["gradcam"][1] > rows["random"][1]     # insertion: Grad-CAM beats a random map on chelsea


def test_the_run_shows_itself(executed):
    nb, folder = executed
    cell = next(cell for cell in nb.cells if "ms.run_explain(" in cell.source)
    shown = _outputs(cell, "text/html")[0].data["text/html"]
    grid = re.search(r'src="data:image/png;base64,([^"]+)"', shown).group(1)
    records = [json.loads(line) for line in (folder / "out" / "notebook" / "manifest.jsonl").read_text().splitlines()]
    assert base64.b64decode(grid) == (folder / "out" / "notebook" / records[0]["folder"] / "grid.png").read_bytes()
    assert "<td>smoothgrad</td>" in shown and "%</td>" in shown
