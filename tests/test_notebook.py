"""The notebook API (issue 24): examples/lesson2.ipynb run in a real kernel, predict on any image kind,
the cleaner widget over `ursa clean`'s log, the device through auto, the console in a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import HELDOUT, ROOT, SAMPLE

NOTEBOOK = ROOT / "examples" / "lesson2.ipynb"
PNG = b"\x89PNG\r\n\x1a\n"


def cell_source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def code_cell(nb, starts: str, exact: bool = False):
    """The code cell whose source starts with (or is) `starts`: the test names cells by what they run."""
    found = [c for c in nb.cells if c.cell_type == "code"
             and (cell_source(c) == starts if exact else cell_source(c).startswith(starts))]
    assert len(found) == 1, starts
    return found[0]


def pngs(cell) -> list[bytes]:
    import base64

    return [base64.b64decode(o["data"]["image/png"]) for o in cell.get("outputs", [])
            if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})]


def result(cell) -> dict:
    """The cell's value as the notebook displayed it (mime type -> content)."""
    found = [o["data"] for o in cell.get("outputs", []) if o.get("output_type") == "execute_result"]
    assert len(found) == 1, cell_source(cell)
    return found[0]


def text_of(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append(o["text"])
        elif "text/plain" in o.get("data", {}):
            out.append(o["data"]["text/plain"])
    return "".join(out)


@pytest.mark.slow
def test_lesson2_notebook_runs_in_a_real_kernel(tmp_path: Path):
    """Every cell runs without an error; the pictures are inline PNGs; predict answers right on held-out images."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    data = tmp_path / "bears"
    import shutil

    shutil.copytree(SAMPLE, data)  # the cleaner writes its log into the data folder: a copy
    env = {"URSA_NB_DATA": str(data), "URSA_NB_HELDOUT": str(HELDOUT), "URSA_NB_OUT": str(tmp_path / "run"),
           "URSA_NB_SIZE": "0", "URSA_NB_EPOCHS": "4", "URSA_NB_BUDGET": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()  # raises CellExecutionError on the first cell that fails
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for c in nb.cells:
        for o in c.get("outputs", []):
            assert o.get("output_type") != "error", o
            if o.get("output_type") == "stream":
                assert "\x1b[" not in o["text"], "escape codes in a notebook output"
    for starts in ("dls.show_batch()", "learn.lr_find()", "interp = ", "interp.plot_top_losses("):
        got = pngs(code_cell(nb, starts))
        assert len(got) == 1 and got[0].startswith(PNG), starts
    # objects show themselves: the learner, the interpretation's answer, a prediction's bars
    learner_html = result(code_cell(nb, "learn = ursa.vision_learner"))["text/html"]
    assert "efficientnet_lite0" in learner_html and "<table>" in learner_html
    assert "error_rate" in result(code_cell(nb, "learn", exact=True))["text/html"]  # after training: its epoch table
    assert "<table>" in result(code_cell(nb, "learn2.predict_one("))["text/html"]
    assert result(code_cell(nb, "interp.most_confused()"))["text/plain"].startswith("[")
    assert "application/vnd.jupyter.widget-view+json" in result(code_cell(nb, "cleaner = "))
    answers = [line for line in text_of(code_cell(nb, "from PIL import Image")).splitlines() if ": " in line]
    assert len(answers) == len(list(HELDOUT.iterdir()))
    for line in answers:
        name, said = line.split(": ")
        assert said.split()[0] == name.split("_")[0], line  # heldout files are named after their class
    served = text_of(code_cell(nb, "import socket"))
    assert "served answer teddy" in served, served
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "model.onnx").is_file()


# --- predict on every kind of image ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_predict_same_answer_for_pil_numpy_path_and_bytes(tiny_model: Path, backend: str, one_thread):
    """fastai users pass a PIL image: the same answer as the file's path, its bytes and its pixels as an array."""
    import ursa

    learn = ursa.load_learner(tiny_model, backend=backend)
    for f in sorted(HELDOUT.iterdir()):
        by_path = learn.predict(f)
        by_bytes = learn.predict(f.read_bytes())
        by_pil = learn.predict(Image.open(f))
        by_array = learn.predict(np.asarray(Image.open(f)))
        assert by_path == by_bytes  # the same bytes, the same decode
        assert by_pil == by_array  # the same pixels
        assert by_pil[:2] == by_path[:2], f  # the same class; a decoded image misses the JPEG's reduced decode
        for c, p in by_path[2].items():
            assert abs(by_pil[2][c] - p) < 0.02, (f, c)


def test_a_bad_array_is_one_clear_line(tiny_model: Path):
    import ursa
    from ursa.errors import ImageError

    learn = ursa.load_learner(tiny_model, backend="torch")
    with pytest.raises(ImageError, match=r"expected a uint8 array of shape HxW, HxWx3 or HxWx4, got float64 \(4, 4, 3\)"):
        learn.predict(np.zeros((4, 4, 3)))
    gray = np.full((40, 50), 128, dtype=np.uint8)  # grayscale works, as a grayscale file does
    assert learn.predict(gray)[0] in learn.classes


# --- import ursa --------------------------------------------------------------------------------


def test_import_ursa_is_light_and_names_load_on_use():
    """`import ursa` pulls in neither torch nor the notebook modules; the names resolve when used."""
    code = ("import sys, ursa; assert 'torch' not in sys.modules, 'torch'; "
            "assert 'ursa.notebook' not in sys.modules; "
            "assert ursa.ImageDataLoaders.__name__ == 'ImageDataLoaders'; "
            "assert callable(ursa.vision_learner) and callable(ursa.load_learner); "
            "assert 'vision_learner' in dir(ursa); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    import ursa

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ursa.nope  # noqa: B018
    blocked = ("import sys, importlib.abc\n"
               "class Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'ipywidgets':\n"
               "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "import ursa\n"
               "try:\n"
               "    ursa.ImageClassifierCleaner\n"
               "except ModuleNotFoundError as e:\n"
               "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.stdout.strip() == ("ursa.ImageClassifierCleaner needs the 'notebook' extra (no module 'ipywidgets' "
                                "here): pip install 'ursa[notebook]'"), r.stdout + r.stderr


# --- the device: auto ----------------------------------------------------------------------------


def test_vision_learner_picks_the_cpu_through_auto(monkeypatch):
    """No GPU here: the learner asks util.device for auto (as the CLI does) and gets the CPU."""
    import torch

    import ursa
    import ursa.training.learner as learner_module
    from ursa.training.config import LearnerConfig
    from ursa.util.device import resolve_device

    asked = []
    monkeypatch.setattr(learner_module, "resolve_device", lambda spec: asked.append(spec) or resolve_device(spec))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert LearnerConfig().device == "auto"
    dls = ursa.ImageDataLoaders.from_folder(SAMPLE, valid_pct=0.2, seed=42)
    learn = ursa.vision_learner(dls, size=64, quiet=True)
    assert learn.cfg.device == "auto"
    assert learn.learner.device == torch.device("cpu") and learn.learner.config.device == "cpu"
    from ursa.training.learner import Learner

    Learner(learn.learner.dls, learn.model, LearnerConfig(quiet=True))  # a Learner made by hand: auto too
    assert asked[-1] == "auto"
    other_seed = ursa.vision_learner(dls, size=64, quiet=True, seed=7)  # another training seed, the same split
    assert {other_seed.dataset.rel(i) for i in other_seed.dataset.valid_idx} == \
        {dls.dataset.rel(i) for i in dls.dataset.valid_idx}
    with pytest.raises(Exception, match="expected one of TrainConfig's settings"):
        ursa.vision_learner(dls, epoch=3)  # a typo is one clear line, not a TypeError
    learn.fine_tune(epochs=1, budget=0)  # a budget given to fine_tune counts, as --budget would: the frozen stage only
    assert (learn.plan.budget, learn.plan.budget_why, learn.plan.fine_tune.value) == (0, "--budget", "budget_zero")
    assert [r["stage"] for r in learn.history] == ["frozen"]


# --- the console in a pipe -------------------------------------------------------------------------


def test_cli_lines_longer_than_80_are_not_broken_when_piped(tmp_path: Path):
    """`ursa train ... 2>&1 | cat` (make, CI, `!ursa` in a notebook): every sentence on one line."""
    r = subprocess.run([sys.executable, "-m", "ursa", "train", str(SAMPLE), "--out", str(tmp_path / "run"),
                        "--epochs", "1", "--size", "64", "--budget", "0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "COLUMNS": "", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    flips = [line for line in lines if line.startswith("recipe: flips horizontal:")]
    assert len(flips) == 1 and len(flips[0]) > 80, r.stderr
    assert flips[0].endswith("for symbols"), flips[0]  # the whole sentence, not cut at 80 columns
    assert max(len(line) for line in lines) > 80


# --- the cleaner widget ----------------------------------------------------------------------------

RESTARTED = """
import json, sys
from ursa.notebook.cleaner import ImageClassifierCleaner
c = ImageClassifierCleaner(sys.argv[1], data=sys.argv[2])
c.category.value = sys.argv[3]
print(json.dumps(dict(zip(c.names, [d.value for d in c.choices]))))
"""


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # a refused widget closes cleanly
def test_cleaner_widget_decisions_land_in_the_log_and_survive(tiny_model: Path, sample_copy: Path):
    """Choose in the widget: the log has it at once; switching category and a new kernel show it again."""
    pytest.importorskip("ipywidgets")
    from ursa.apps.clean import LOG_NAME
    from ursa.notebook.cleaner import DELETE, KEEP, ImageClassifierCleaner

    cleaner = ImageClassifierCleaner(str(tiny_model), data=sample_copy, max_n=4)
    cleaner.category.value = "grizzly"
    assert len(cleaner.choices) >= 2 and all(d.value == KEEP for d in cleaner.choices)
    relabelled, deleted = cleaner.names[0], cleaner.names[1]
    cleaner.choices[0].value = "teddy"
    cleaner.choices[1].value = DELETE
    log = (sample_copy / LOG_NAME).read_text().splitlines()
    assert log[0] == "time,file,old_label,action,new_label"
    assert log[1].split(",")[1:] == [relabelled, "grizzly", "relabel", "teddy"]
    assert log[2].split(",")[1:] == [deleted, "grizzly", "exclude", ""]
    cleaned = (sample_copy / "cleaned.csv").read_text()
    assert f"{relabelled},teddy" in cleaned and deleted not in cleaned
    cleaner.category.value = "black"  # fastai#3084: the choices vanished here
    assert relabelled not in cleaner.names
    cleaner.category.value = "grizzly"
    shown = dict(zip(cleaner.names, [d.value for d in cleaner.choices]))
    assert shown[relabelled] == "teddy" and shown[deleted] == DELETE
    cleaner.split.value = "Valid"
    assert all(n not in cleaner.names for n in (relabelled, deleted))
    from ursa.errors import BusyError

    with pytest.raises(BusyError, match="another ursa process is using this data folder"):
        ImageClassifierCleaner(str(tiny_model), data=sample_copy)  # one cleaner per folder, as `ursa clean`
    cleaner.close()  # the kernel restarts: its lock goes with it
    # A restarted kernel: a new process replays the log
    r = subprocess.run([sys.executable, "-c", RESTARTED, str(tiny_model), str(sample_copy), "grizzly"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout.strip().splitlines()[-1])
    assert again[relabelled] == "teddy" and again[deleted] == DELETE
    assert cleaner.summary()["relabelled"] == 1 and cleaner.summary()["excluded"] == 1


# --- data and pictures, without training ------------------------------------------------------------


def test_data_from_folder_and_csv_and_pictures_outside_a_notebook(tmp_path: Path):
    """from_csv reads `ursa clean`'s cleaned.csv as --csv does; outside a kernel pictures are returned, not shown."""
    import ursa
    from ursa.notebook.pictures import Picture, in_notebook, show

    dls = ursa.ImageDataLoaders.from_folder(SAMPLE, valid_pct=0.2, seed=42)
    assert dls.classes == ["black", "grizzly", "teddy"] and "<table>" in dls._repr_html_()
    files = sorted(p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*.jpg"))
    keep = [f for f in files if f.startswith("black/")][:15] + [f for f in files if f.startswith("grizzly/")][:15]
    csv = tmp_path / "cleaned.csv"
    csv.write_text("name,label\n" + "".join(f"{f},{f.split('/')[0]}\n" for f in keep))
    from_csv = ursa.ImageDataLoaders.from_csv(SAMPLE, csv)
    assert from_csv.classes == ["black", "grizzly"] and len(from_csv.dataset) == len(keep)
    assert not in_notebook()
    pic = dls.show_batch(n=4)
    assert isinstance(pic, Picture) and pic._repr_png_().startswith(PNG)
    assert show(pic) is pic
    assert pic.save(tmp_path / "batch.png").read_bytes() == pic.png
