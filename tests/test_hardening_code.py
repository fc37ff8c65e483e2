"""Issue 29, code that invites the next bug: callback events registered (a misspelling is an error), the
learner's state set only by the learner and its callbacks, every learner attribute created in __init__."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_misspelled_event_method_is_refused_when_the_callback_is_defined() -> None:
    from ursa.training.callbacks import EVENTS, Callback

    with pytest.raises(TypeError, match="after_epcoh is not an event"):
        class Typo(Callback):  # noqa: F841 - defining it is the test
            def after_epcoh(self, learn) -> None: ...

    class Fine(Callback):
        def after_epoch(self, learn) -> None: ...

        def before_fit(self, learn) -> None: ...

    assert "after_epoch" in EVENTS and "after_cancel_fit" in EVENTS


def test_a_misspelled_event_given_to_a_learner_is_refused(tmp_path) -> None:
    from ursa.training.callbacks import Callback, check_callbacks

    cb = Callback()
    cb.before_fitt = lambda learn: None  # an attribute, not a method: still caught when registered
    with pytest.raises(TypeError, match="before_fitt"):
        check_callbacks([cb])
    with pytest.raises(TypeError, match="expected a Callback"):
        check_callbacks([object()])


def test_every_event_the_loop_fires_is_registered() -> None:
    """The loop's _event("...") names and EVENTS agree: a new event cannot be fired unregistered."""
    from ursa.training.callbacks import EVENTS

    tree = ast.parse((ROOT / "ursa" / "training" / "learner.py").read_text())
    fired = {n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "_event" and n.args and isinstance(n.args[0], ast.Constant)}
    assert fired and fired <= set(EVENTS), fired - set(EVENTS)
    assert set(EVENTS) - fired <= {"after_loss", "after_step", "before_batch"}  # fired in _one_batch (checked below)
    one_batch = (ROOT / "ursa" / "training" / "learner.py").read_text()
    assert all(f'"{e}"' in one_batch for e in EVENTS)


def _learn_targets(node: ast.AST) -> list[str]:
    """Assignment targets rooted at the name `learn` (learn.x = ..., learn.a.b[:] = ..., learn.x, y = ...)."""
    found = []
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    stack = list(targets)
    while stack:
        t = stack.pop()
        if isinstance(t, (ast.Tuple, ast.List)):
            stack.extend(t.elts)
            continue
        root, chain = t, False
        while isinstance(root, (ast.Attribute, ast.Subscript)):
            chain = True
            root = root.value
        if chain and isinstance(root, ast.Name) and root.id in ("learn", "learner"):
            found.append(ast.unparse(t))
    return found


def test_no_module_but_the_learner_writes_into_the_learner() -> None:
    """checkpoint.py restores through learn.recorder.restore / learn.best.restore / learn.restore_epochs;
    the recipe says learn.recovered(); nothing outside learner.py assigns to learn.*."""
    bad = []
    for path in (ROOT / "ursa").rglob("*.py"):
        if path.name == "learner.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {t}" for t in _learn_targets(node)]
    assert not bad, bad


def test_every_learner_attribute_exists_after_init(tmp_path) -> None:
    import torch
    from PIL import Image

    from ursa.training.config import LearnerConfig
    from ursa.training.learner import Learner
    from ursa.vision.data import load_dataset
    from ursa.vision.loaders import dataloaders
    from ursa.vision.models import create_model, get_spec

    for c, col in (("a", (200, 20, 20)), ("b", (20, 20, 200))):
        (tmp_path / c).mkdir()
        for i in range(6):
            Image.new("RGB", (36, 36), (col[0], i * 30, col[2])).save(tmp_path / c / f"{i}.png")
    torch.manual_seed(0)
    ds = load_dataset(tmp_path)
    spec = get_spec("efficientnet_lite0")
    learn = Learner(dataloaders(ds, 32, spec.mean, spec.std, bs=4),
                    create_model("efficientnet_lite0", n_classes=2, pretrained=False), LearnerConfig(quiet=True, cache=False))
    before = set(vars(learn))
    learn.fit_one_cycle(1, 1e-3)
    assert set(vars(learn)) - before == set()


def test_every_test_runs_under_a_timeout_and_the_slowest_are_listed(pytestconfig) -> None:
    """Issue 29: no per-test timeout meant one hang stalled CI forever; --durations names the slow ones."""
    assert float(pytestconfig.getini("timeout")) > 0  # read by pytest-timeout, a dev dependency
    assert "--durations=" in " ".join(pytestconfig.getini("addopts"))
