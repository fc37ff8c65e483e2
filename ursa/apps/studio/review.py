"""A finished run, looked at: its report's numbers, live predictions from its ONNX file, the cleaner over it.

- ``Live``: the run's model.onnx through ``current_onnx``, the loader ``ursa serve`` uses, and the
  answer is ``Prediction.to_json()``, what serve's /predict sends, so the page shows what the
  server will answer (a test holds them equal).
- ``Review``: report.json's error, confusion matrix and top losses; and, on demand, the cleaner's
  own session (``apps.clean``: the model pass, the rankings, ``Decisions`` with its crash-safe
  log in the project folder); ``apply`` carries the decisions out on the class folders by moving
  files (relabel: into the new class's folder; exclude: into ``_removed/``), never deleting one.
  While the session is open the review holds the cleaner's lock (``DATA/.ursa-clean.lock``, the one
  `ursa clean` and the notebook's cleaner take), so a cleaner elsewhere on the same folder is
  refused naming the studio, and a running one makes the studio's panel say so.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from ursa.apps.clean.decisions import CLEAN_LOCK, LOCK_WHAT  # torch-free (the package loads lazily)
from ursa.apps.studio.project import REMOVED
from ursa.errors import UrsaError
from ursa.inference.runtime import current_onnx
from ursa.util.device import default_threads
from ursa.util.files import link_no_clobber
from ursa.util.lock import FolderLock

TOP = 48  # images of each ranking the page shows


class Live:
    """The latest run's exported model, loaded once per run; thread-safe to swap."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or default_threads()
        self.pred: Any = None
        self.run: Path | None = None
        self._lock = threading.Lock()

    def load(self, run: Path) -> None:
        """Load RUN/model.onnx (refused when it is missing or older than the model file, as serve refuses it)."""
        if self.run == run and self.pred is not None:
            return
        pred, why = current_onnx(run / "model.safetensors", "onnx", self.threads)
        if pred is None:
            raise UrsaError(f"{run}: no current model.onnx ({why}); run `ursa export {run / 'model.safetensors'} --onnx`")
        with self._lock:
            self.pred, self.run = pred, run

    def predict(self, data: bytes) -> dict[str, Any]:
        """One image's answer, as `ursa serve` answers POST /predict (ImageError when it does not decode)."""
        pred = self.pred
        if pred is None:
            raise LookupError("no model yet: train one first")
        t0 = time.perf_counter()
        answer = pred.predict_one(data).to_json()
        answer["ms"] = round(1000 * (time.perf_counter() - t0), 1)
        return answer


    def heat_map(self, data: bytes) -> bytes:
        """The picture with the evidence for its predicted class over it (PNG), as serve's /explain draws it."""
        from ursa.inference.explain import explain_arrays

        pred = self.pred
        if pred is None:
            raise LookupError("no model yet: train one first")
        return explain_arrays(pred, [pred.preprocess(data)])[0].png()


class Review:
    """One run's results and, once asked for, the cleaner's session over the project."""

    def __init__(self, project: Path, run: Path) -> None:
        self.project, self.run = Path(project), Path(run)
        self.report = json.loads((self.run / "report.json").read_text(encoding="utf-8"))
        self.session: Any = None
        self.lock: FolderLock | None = None  # the cleaner's lock on the project, held while the session is open
        self.error = ""
        self._int8: tuple[int, Any] | None = None
        self._lock = threading.Lock()

    def summary(self) -> dict[str, Any]:
        """What the results panel shows: error, matrix, top losses, leakage, files to download."""
        r = self.report
        int8 = self.run / "model.int8.onnx"
        return {
            "run": str(self.run), "classes": r.get("classes"), "error_rate": r.get("error_rate"),
            "n_valid": sum(sum(row) for row in r.get("confusion_matrix") or []),
            "confusion_matrix": r.get("confusion_matrix"), "top_losses": (r.get("top_losses") or [])[:TOP],
            "leakage": (r.get("leakage") or {}).get("n_pairs", 0), "advice": [f"{a.get('title', '')}: {a.get('message', '')}" for a in r.get("advice") or []],
            "files": {name: (self.run / name).is_file() for name in ("model.safetensors", "model.onnx", "model.int8.onnx")},
            "int8": self.int8_report(int8),
            "cleaner": self.cleaner_state(),
        }

    def int8_report(self, path: Path) -> Any:
        """The INT8 file's stored check, read once per file version (None without one)."""
        if not path.is_file():
            return None
        key = path.stat().st_mtime_ns
        if self._int8 is None or self._int8[0] != key:
            self._int8 = (key, _int8_report(path))
        return self._int8[1]

    def open_cleaner(self) -> None:
        """The cleaner's model pass and rankings (apps.clean, as `ursa clean` runs them); slow: call in a thread."""
        with self._lock:
            if self.session is not None:
                return
            from ursa.apps import clean  # torch: only now

            self.error = ""
            try:
                lock = FolderLock(self.project, CLEAN_LOCK, LOCK_WHAT).acquire()  # BusyError naming `ursa clean`
            except UrsaError as e:
                self.error = str(e)
                return
            try:
                ds, scores, ranks = clean.prepare(self.project, self.run / "model.safetensors", quiet=True)
                self.session = clean.start_session(ds, scores, ranks, model_name=str(self.run / "model.safetensors"))
                self.lock = lock
            except UrsaError as e:
                self.error = str(e)
            finally:
                if self.lock is not lock:
                    lock.release()

    def close(self) -> None:
        """End the cleaner's session (its log stays, replayed next time) and release the cleaner's lock."""
        with self._lock:
            self.session = None
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def cleaner_state(self) -> dict[str, Any] | None:
        """The rankings' first images with their decisions, or None before the cleaner ran."""
        s = self.session
        if s is None:
            return {"error": self.error} if self.error else None
        sc, rk = s.scores, s.ranks

        def row(i: int) -> dict[str, Any]:
            d = s.decisions.item(sc.names[i])
            return {"name": sc.names[i], "label": sc.classes[sc.labels[i]], "pred": sc.classes[sc.pred[i]],
                    "prob": round(float(sc.probs[i, sc.pred[i]]), 4), "status": d["status"], "new_label": d["label"]}
        return {"classes": sc.classes, "losses": [row(i) for i in rk.top_losses[:TOP]],
                "issues": [row(i) for i in rk.issues[:TOP]], "summary": s.decisions.summary(),
                "log": str(s.decisions.log_path)}

    def decide(self, name: str, action: str, label: str = "") -> dict[str, Any]:
        """One decision through the cleaner's Decisions (KeyError / ValueError as it raises them)."""
        if self.session is None:
            raise LookupError("open the cleaner first")
        return self.session.decisions.decide(name, action, label)

    def apply(self) -> dict[str, int]:
        """Carry the decisions out on the folders: relabelled images move to their class, excluded ones to _removed/
        (an image no longer at its name, or a relabel into a class folder gone since, is left as it is: skipped)."""
        if self.session is None:
            raise LookupError("open the cleaner first")
        dec = self.session.decisions
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = {"relabelled": 0, "excluded": 0, "skipped": 0}
        for name, (action, label) in sorted(dec.state.items()):
            src = self.project / name
            if action == "relabel" and label != dec.labels[name]:
                dst, key = self.project / label / Path(name).name, "relabelled"
            elif action == "exclude":
                dst, key = self.project / REMOVED / f"excluded-{stamp}" / name, "excluded"
            else:
                continue
            if not src.is_file() or (key == "relabelled" and not dst.parent.is_dir()):
                moved["skipped"] += 1  # renamed, removed or moved since the model pass: left as it is, never re-made
                continue
            move_no_clobber(src, dst)
            moved[key] += 1
        done = self.project / REMOVED / f"decisions-{stamp}"  # the log and cleaned.csv, kept as the record of the moves
        for path in (dec.log_path, dec.cleaned_path):
            if path.is_file():
                move_no_clobber(path, done / path.name)
        self.close()  # the folders changed: the next look is a new model pass
        return moved


def move_no_clobber(src: Path, dst: Path) -> Path:
    """Move a file to dst (or a free name beside it): ``link_no_clobber`` first (a hard link, or a whole copy where the
    file system has none), then the old name dropped, so at every moment the file exists somewhere."""
    moved = link_no_clobber(src, dst)
    os.unlink(src)
    return moved


def _int8_report(path: Path) -> Any:
    """The agreement check `ursa export --int8` stored in the INT8 file (None when it cannot be read)."""
    try:
        from ursa.inference.runtime import load_onnx

        return load_onnx(path, threads=1).int8_report()
    except (UrsaError, OSError):
        return None
