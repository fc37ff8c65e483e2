"""Clean a dataset after the first model: rank images by loss, likely label errors and duplicates.

One batched pass of the model gives every image's probabilities, loss and pooled body embedding.
From those: top losses; likely label errors by confident learning (cleanlab) on out-of-fold
probabilities of a logistic regression on the embeddings; near-duplicates by cosine similarity
and exact duplicates by sha256. A small local web app (Starlette) shows them and records the
user's decisions: appended to ``DATA/clean_log.csv`` (the source of truth, replayed on start,
last decision wins) and mirrored in ``DATA/cleaned.csv`` (fastai's ``name,label``). No image
is ever moved, rewritten or deleted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import ipaddress
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ursa.errors import DataError, UrsaError

log = logging.getLogger("ursa")

LOG_NAME = "clean_log.csv"
CLEANED_NAME = "cleaned.csv"
LOG_COLUMNS = ["time", "file", "old_label", "action", "new_label"]
ACTIONS = ("keep", "exclude", "relabel", "undo")
# Cosine similarity of L2-normalised pooled embeddings above which two images are shown as
# near-duplicates. Measured on bears (benchmarks/clean_eval.py, docs/clean.md): injected resized
# and re-encoded copies score 0.91-1.0; every other pair above 0.88 is a crop or re-shoot of the
# same photo, and distinct photos of similar bears start below about 0.86.
DUP_THRESHOLD = 0.88
MAX_PAIRS = 5000
FOLDS = 5
WEB = Path(__file__).resolve().parent / "web"
CONTENT_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "GIF": "image/gif",
                 "WEBP": "image/webp", "BMP": "image/bmp"}


# ---------------------------------------------------------------------------------------------
# One pass of the model over every image.


@dataclass
class Scores:
    """What one pass of the model says about every item: probabilities, loss, embedding, hash."""

    names: list[str]
    labels: np.ndarray  # [N] int, index into classes
    classes: list[str]
    probs: np.ndarray  # [N, C] float32, NaN rows for unreadable items
    loss: np.ndarray  # [N] float32, NaN for unreadable items
    emb: np.ndarray  # [N, F] float32 pooled body features, zeros for unreadable items
    sha256: list[str]  # "" when the file could not be read at all
    unreadable: dict[int, str] = field(default_factory=dict)
    pool: str = "avg"  # "concat": emb is [max-pool, avg-pool] side by side

    @property
    def avg_emb(self) -> np.ndarray:
        """The average-pooled half: better (and faster) for the out-of-fold classifier than max+avg."""
        return self.emb[:, self.emb.shape[1] // 2:] if self.pool == "concat" else self.emb

    @property
    def readable(self) -> np.ndarray:
        """False for items that did not decode: they have no probabilities or embedding."""
        ok = np.ones(len(self.names), dtype=bool)
        ok[list(self.unreadable)] = False
        return ok

    @property
    def pred(self) -> np.ndarray:
        """Predicted class per item, -1 when unreadable."""
        p = np.where(np.isnan(self.probs), -np.inf, self.probs)
        out = p.argmax(1)
        out[~self.readable] = -1
        return out


def _class_map(data_classes: Sequence[str], model_classes: Sequence[str]) -> list[int]:
    """Column of each data class in the model's output; the model must know every data class."""
    missing = [c for c in data_classes if c not in model_classes]
    if missing:
        raise DataError(
            f"the model was trained on classes {', '.join(model_classes)} but the data has "
            f"{', '.join(missing)} too; train a model on this data first (`ursa train DATA`)"
        )
    return [list(model_classes).index(c) for c in data_classes]


def _read_item(path: Path, short_side: int, tfm: Callable) -> tuple[Any, str, str]:
    """(tensor or None, sha256 of the file's bytes, reason when unreadable); reads each file once."""
    from ursa.vision.transforms import pil_to_tensor, resize_short
    from ursa.errors import ImageError
    from ursa.vision.images import open_image

    try:
        data = path.read_bytes()
    except OSError as e:
        return None, "", f"missing: cannot read file ({e.strerror or e})"
    digest = hashlib.sha256(data).hexdigest()
    try:
        im = open_image(data, min_size=short_side)
    except ImageError as e:
        return None, digest, f"{e.kind}: {e.reason}"
    return tfm(pil_to_tensor(resize_short(im, short_side))), digest, ""


def score_dataset(ds, model, meta, bs: int = 64, progress: Callable[[int], None] | None = None,
                  workers: int | None = None) -> Scores:
    """One batched eval-mode pass (features, then head): probabilities, losses, embeddings of every item."""
    import torch

    from ursa.vision.transforms import decode_size, eval_transform

    cols = _class_map(ds.classes, meta.classes)
    size = int(meta.input_size)
    short = decode_size(size)  # the same preprocessing as the validation set in training
    tfm = eval_transform(size, meta.mean, meta.std)
    model = model.eval().to(memory_format=torch.channels_last)
    from ursa.inference.onnx import onnx_features

    fast = onnx_features(model, size)  # 2.4x faster than eager torch here (bears); None: torch

    n = len(ds)
    n_feat = model.head_cfg.n_features * (2 if model.head_cfg.pool == "concat" else 1)
    probs = np.full((n, len(ds.classes)), np.nan, dtype=np.float32)
    emb = np.zeros((n, n_feat), dtype=np.float32)
    hashes = [""] * n
    unreadable: dict[int, str] = {}
    workers = workers or min(4, (os.cpu_count() or 1) + 1)
    chunks = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]

    def decode(chunk: list[int]):
        return [pool.submit(_read_item, ds.files[i], short, tfm) for i in chunk]

    with ThreadPoolExecutor(workers) as pool, torch.inference_mode():
        pending = decode(chunks[0]) if chunks else []
        for k, chunk in enumerate(chunks):
            results = [f.result() for f in pending]
            pending = decode(chunks[k + 1]) if k + 1 < len(chunks) else []  # decode ahead while the model runs
            good, xs = [], []
            for i, (x, digest, reason) in zip(chunk, results):
                hashes[i] = digest
                if x is None:
                    unreadable[i] = reason
                else:
                    good.append(i)
                    xs.append(x)
            if xs:
                xb = torch.stack(xs).contiguous(memory_format=torch.channels_last)
                f = model.features(xb) if fast is None else fast(xb)
                p = model.head(f).float().softmax(1)[:, cols]
                p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
                probs[good] = p.numpy()
                emb[good] = f.float().numpy()
            if progress:
                progress(len(chunk))
    labels = np.asarray(ds.labels, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = -np.log(np.clip(probs[np.arange(n), labels], 1e-12, 1.0)).astype(np.float32)
    return Scores([ds.rel(i) for i in range(n)], labels, list(ds.classes), probs, loss, emb, hashes, unreadable,
                  model.head_cfg.pool)


# ---------------------------------------------------------------------------------------------
# Rankings.


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows to unit length, so a dot product is a cosine similarity."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def out_of_fold_probs(emb: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = FOLDS,
                      seed: int = 0, C: float = 1.0) -> np.ndarray:
    """Probabilities for each item from a model that never saw it: what confident learning needs.

    A logistic regression on L2-normalised embeddings, K-fold: cheap (seconds) and free of the
    memorisation that makes a network's own training-set probabilities look confident.
    (Standardising the features first made it worse on bears: precision@N 0.81 instead of 0.93.)
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    x = l2_normalise(emb)
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=n_classes)
    k = int(min(folds, counts[counts > 0].min()))
    if k < 2:
        raise ValueError("a class has fewer than 2 readable images: no out-of-fold probabilities")
    out = np.zeros((len(x), n_classes), dtype=np.float64)
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, labels):
        clf = LogisticRegression(C=C, max_iter=2000, tol=1e-3)
        clf.fit(x[tr], labels[tr])
        out[np.ix_(te, clf.classes_)] = clf.predict_proba(x[te])
    return out


def label_issues(labels: np.ndarray, pred_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(likely errors, most likely first; label quality of every item; flagged by confident learning).

    The list is cleanlab's confident-learning set (``find_label_issues``) together with every item
    whose out-of-fold prediction disagrees with its label, ordered by label quality (self-confidence).
    On bears with 10% flipped labels the confident-learning set alone held only the flipped
    images 0.88-0.93 of the time in its first N, its selection not being by self-confidence; this
    ordering keeps 0.94 (benchmarks/clean_eval.py), and people see the clearest cases first.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels)
    quality = np.asarray(get_label_quality_scores(labels, pred_probs, method="self_confidence"), dtype=np.float64)
    try:
        cl = np.asarray(find_label_issues(labels, pred_probs), dtype=bool)
    except (ValueError, AssertionError) as e:  # too few items per class for the confident joint
        log.warning("confident learning skipped (%s); listing disagreements only", e)
        cl = np.zeros(len(labels), dtype=bool)
    likely = np.flatnonzero(cl | (pred_probs.argmax(1) != labels))
    order = likely[np.argsort(quality[likely], kind="stable")]
    return order.astype(np.int64), quality, cl


@dataclass(frozen=True)
class Pair:
    """Two items that look alike: cosine similarity of embeddings, and whether the bytes are identical."""

    a: int
    b: int
    similarity: float
    exact: bool


def find_duplicates(emb: np.ndarray, hashes: Sequence[str], readable: np.ndarray | None = None,
                    threshold: float = DUP_THRESHOLD, max_pairs: int = MAX_PAIRS, block: int = 1024) -> list[Pair]:
    """Byte-identical files, then pairs above the cosine threshold, most similar first.

    Identical files pair with the first of their group (n copies give n-1 pairs, not n^2/2: a
    placeholder image downloaded 500 times stays readable); similar pairs are compared block by
    block and pruned to the best max_pairs as they come, so memory never grows with N^2.
    """
    n = len(hashes)
    readable = np.ones(n, dtype=bool) if readable is None else np.asarray(readable, dtype=bool)
    first: dict[str, int] = {}
    exact: list[Pair] = []
    for i, h in enumerate(hashes):
        if not h:
            continue
        if h in first:
            exact.append(Pair(first[h], i, 1.0, True))
        else:
            first[h] = i
    idx = np.flatnonzero(readable)
    x = l2_normalise(emb[idx]) if len(idx) else np.zeros((0, 1), dtype=np.float32)
    found: list[tuple[float, int, int]] = []
    for s in range(0, len(idx), block):
        m = x[s:s + block] @ x.T
        rows, cols = np.nonzero(np.triu(m >= threshold, k=s + 1))  # each pair once, j > i
        for r, c in zip(rows.tolist(), cols.tolist()):
            a, b = int(idx[s + r]), int(idx[c])
            if hashes[a] and hashes[a] == hashes[b]:
                continue  # identical files: already paired with their group's first
            found.append((min(float(m[r, c]), 1.0), a, b))
        if len(found) > 4 * max_pairs:
            found = sorted(found, reverse=True)[:max_pairs]
    near = [Pair(a, b, round(sim, 4), False) for sim, a, b in sorted(found, key=lambda t: (-t[0], t[1], t[2]))]
    return (exact + near)[:max_pairs]


@dataclass
class Rankings:
    """The three views' orders: top losses, likely label errors, duplicates."""

    top_losses: list[int]
    issues: list[int]  # likely label errors, most likely first (see label_issues)
    quality: np.ndarray  # [N] label quality (out-of-fold self-confidence), NaN for unreadable
    suggested: np.ndarray  # [N] class the out-of-fold model prefers, -1 for unreadable
    duplicates: list[Pair]
    confident: np.ndarray | None = None  # [N] bool: flagged by confident learning itself
    threshold: float = DUP_THRESHOLD
    method: str = "confident learning on out-of-fold logistic-regression probabilities"


def rank(scores: Scores, threshold: float = DUP_THRESHOLD) -> Rankings:
    """All rankings from one pass's scores; unreadable items take part only in exact duplicates."""
    n = len(scores.names)
    ok = np.flatnonzero(scores.readable)
    top = ok[np.argsort(-scores.loss[ok], kind="stable")].tolist()
    quality = np.full(n, np.nan)
    suggested = np.full(n, -1, dtype=np.int64)
    confident = np.zeros(n, dtype=bool)
    issues: list[int] = []
    method = "confident learning on out-of-fold logistic-regression probabilities"
    if len(ok):
        try:
            oof = out_of_fold_probs(scores.avg_emb[ok], scores.labels[ok], len(scores.classes))
        except ValueError as e:
            log.warning("%s; using the model's own probabilities", e)
            oof = scores.probs[ok].astype(np.float64)
            method = "confident learning on the model's own probabilities (too few images for K-fold)"
        likely, q, cl = label_issues(scores.labels[ok], oof)
        quality[ok] = q
        suggested[ok] = oof.argmax(1)
        confident[ok] = cl
        issues = ok[likely].tolist()
    dups = find_duplicates(scores.emb, scores.sha256, scores.readable, threshold)
    return Rankings(top, issues, quality, suggested, dups, confident, threshold, method)


# ---------------------------------------------------------------------------------------------
# Export: the rankings as CSV files, for scripts and for checking.


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    from ursa.util.files import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def export_rankings(out: Path, scores: Scores, ranks: Rankings) -> dict[str, Path]:
    """top_losses.csv, label_issues.csv, duplicates.csv (and unreadable.csv) in out; nothing else."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UrsaError(f"{out}: exists and is not a folder; give --export a folder")
    out.mkdir(parents=True, exist_ok=True)
    c, names, pred = scores.classes, scores.names, scores.pred
    files = {
        "top_losses": out / "top_losses.csv",
        "label_issues": out / "label_issues.csv",
        "duplicates": out / "duplicates.csv",
        "unreadable": out / "unreadable.csv",
    }
    _write_csv(files["top_losses"], ["name", "label", "predicted", "loss"],
               [[names[i], c[scores.labels[i]], c[pred[i]], f"{scores.loss[i]:.5f}"] for i in ranks.top_losses])
    cl = ranks.confident if ranks.confident is not None else np.zeros(len(names), dtype=bool)
    _write_csv(files["label_issues"], ["name", "label", "suggested", "quality", "confident_learning"],
               [[names[i], c[scores.labels[i]], c[ranks.suggested[i]], f"{ranks.quality[i]:.5f}", str(bool(cl[i])).lower()]
                for i in ranks.issues])
    _write_csv(files["duplicates"], ["a", "b", "similarity", "exact"],
               [[names[p.a], names[p.b], f"{p.similarity:.4f}", str(p.exact).lower()] for p in ranks.duplicates])
    _write_csv(files["unreadable"], ["name", "reason"], [[names[i], r] for i, r in sorted(scores.unreadable.items())])
    return files


# ---------------------------------------------------------------------------------------------
# Decisions: clean_log.csv is the source of truth, cleaned.csv its current consequence.


class Decisions:
    """Keep / exclude / relabel per item, replayed from the log (last decision wins) and saved as made."""

    def __init__(self, root: Path, names: Sequence[str], labels: Sequence[str], classes: Sequence[str]) -> None:
        self.root = Path(root)
        self.names = list(names)
        self.labels = dict(zip(self.names, labels))  # label as loaded, before any decision
        self.classes = list(classes)
        self.state: dict[str, tuple[str, str]] = {}  # name -> (action, label); absent = undecided
        self.skipped_rows = 0  # damaged rows, unknown actions or classes
        self.other_rows = 0  # rows about files not in the data as loaded (e.g. excluded, then loaded from cleaned.csv)
        self._lock = threading.Lock()

    @property
    def log_path(self) -> Path:
        return self.root / LOG_NAME

    @property
    def cleaned_path(self) -> Path:
        return self.root / CLEANED_NAME

    def load(self) -> int:
        """Replay clean_log.csv; returns how many rows applied (rows for other files or classes are kept but ignored)."""
        path = self.log_path
        if not path.exists():
            return 0
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UrsaError(f"{path}: cannot read the cleaning log ({e}); move it aside to start afresh") from None
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return 0
        if [h.strip() for h in rows[0]] != LOG_COLUMNS:
            raise UrsaError(f"{path}: not a log written by `ursa clean` (header {','.join(rows[0])!r}); "
                            "move it aside, ursa will not overwrite it")
        applied = 0
        for row in rows[1:]:
            if len(row) != len(LOG_COLUMNS):  # e.g. a line cut short by a crash
                self.skipped_rows += 1
                continue
            _, name, _, action, new_label = row
            if name not in self.labels:
                self.other_rows += 1
            elif self._apply(name, action, new_label):
                applied += 1
            else:
                self.skipped_rows += 1
        return applied

    def _apply(self, name: str, action: str, label: str) -> bool:
        if name not in self.labels or action not in ACTIONS:
            return False
        if action == "undo":
            self.state.pop(name, None)
        elif action == "keep":
            self.state[name] = ("keep", self.labels[name])
        elif action == "exclude":
            self.state[name] = ("exclude", "")
        else:
            if label not in self.classes:
                return False
            self.state[name] = ("keep", label) if label == self.labels[name] else ("relabel", label)
        return True

    def decide(self, name: str, action: str, label: str = "") -> dict[str, Any]:
        """Record one decision: validate, append to the log (flushed, fsynced), then rewrite cleaned.csv."""
        if name not in self.labels:
            raise KeyError(name)
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        if action == "relabel" and label not in self.classes:
            raise ValueError(f"unknown class {label!r}; one of {', '.join(self.classes)}")
        old = self.labels[name]
        new = {"keep": old, "exclude": "", "relabel": label, "undo": old}[action]
        with self._lock:
            self._append_log([_now(), name, old, action, new])
            self._apply(name, action, new)
            self.write_cleaned()
            return self.item(name)

    def _append_log(self, row: list[str]) -> None:
        path = self.log_path
        fresh = not path.exists() or path.stat().st_size == 0
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if fresh:
            w.writerow(LOG_COLUMNS)
        w.writerow(row)
        with open(path, "a+b") as f:
            if not fresh:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a previous run died mid-line: never glue onto it
                    f.write(b"\n")
            f.write(buf.getvalue().encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def label_of(self, name: str) -> str | None:
        """The label the item will train with, or None when excluded."""
        action, label = self.state.get(name, ("", self.labels[name]))
        return None if action == "exclude" else label

    def item(self, name: str) -> dict[str, Any]:
        """The item's decision as the page shows it."""
        action, label = self.state.get(name, ("", self.labels[name]))
        return {"name": name, "status": action or None, "label": label or None}

    def summary(self) -> dict[str, int]:
        """Counts for the page's header and the CLI."""
        acts = [a for a, _ in self.state.values()]
        return {"total": len(self.names), "decided": len(acts), "kept": acts.count("keep"),
                "excluded": acts.count("exclude"), "relabelled": acts.count("relabel")}

    def write_cleaned(self) -> Path:
        """cleaned.csv: every item not excluded, with its current or new label; atomic."""
        rows = [[n, lab] for n in self.names if (lab := self.label_of(n)) is not None]
        _write_csv(self.cleaned_path, ["name", "label"], rows)
        return self.cleaned_path


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# The web app.


@dataclass
class CleanSession:
    """Everything the app serves: the data, the model's scores, the rankings and the decisions."""

    root: Path
    files: list[Path]
    scores: Scores
    ranks: Rankings
    decisions: Decisions
    is_valid: list[bool]
    model_name: str = ""
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.scores.names)}

    def state(self) -> dict[str, Any]:
        """The page's whole model, as JSON-ready values (NaN becomes null)."""
        s, r = self.scores, self.ranks
        pred = s.pred
        items = []
        for i, name in enumerate(s.names):
            ok = i not in s.unreadable
            d = self.decisions.item(name)
            items.append({
                "name": name, "label": s.classes[s.labels[i]], "valid": bool(self.is_valid[i]),
                "pred": s.classes[pred[i]] if ok else None,
                "prob": _num(s.probs[i, pred[i]]) if ok else None,
                "loss": _num(s.loss[i]), "quality": _num(r.quality[i]),
                "suggested": s.classes[r.suggested[i]] if r.suggested[i] >= 0 else None,
                "confident": bool(r.confident[i]) if r.confident is not None else False,
                "error": s.unreadable.get(i), "status": d["status"], "new_label": d["label"],
            })
        return {
            "data": str(self.root), "model": self.model_name, "classes": s.classes, "items": items,
            "views": {
                "losses": r.top_losses,
                "issues": r.issues,
                "duplicates": [{"a": p.a, "b": p.b, "similarity": p.similarity, "exact": p.exact} for p in r.duplicates],
                "unreadable": sorted(s.unreadable),
            },
            "method": r.method, "threshold": r.threshold, "summary": self.decisions.summary(),
            "files": {"cleaned": str(self.decisions.cleaned_path), "log": str(self.decisions.log_path)},
        }


def _num(v: Any) -> float | None:
    v = float(v)
    return None if not np.isfinite(v) else round(v, 5)


def allowed_hosts(host: str, port: int) -> set[str]:
    """Host header values that mean this server (anything else is DNS rebinding or a mistake)."""
    names = {host, "localhost", "127.0.0.1", "[::1]"}
    if host in ("0.0.0.0", "::", ""):
        names |= {socket.gethostname(), socket.getfqdn()}
    return {f"{h}:{port}" for h in names} | ({f"{h}" for h in names} if port == 80 else set())


def _host_ok(host: str, allowed: set[str], any_ip: bool) -> bool:
    if host in allowed:
        return True
    if any_ip:  # bound to every interface: any literal address of this machine is its own
        h = host.rsplit(":", 1)[0].strip("[]")
        try:
            ipaddress.ip_address(h)
            return True
        except ValueError:
            return False
    return False


class _Guard:
    """ASGI middleware: 403 unless Host is ours, and for POST unless Origin (when sent) is ours too."""

    def __init__(self, app: Any, hosts: set[str], any_ip: bool = False) -> None:
        self.app, self.hosts, self.any_ip = app, hosts, any_ip

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            host = headers.get("host", "")
            why = ""
            if not _host_ok(host, self.hosts, self.any_ip):
                why = f"Host {host!r} is not this server"
            elif scope["method"] not in ("GET", "HEAD"):
                origin = headers.get("origin")
                if origin is not None and origin != f"http://{host}":
                    why = f"Origin {origin!r} is not this server"
                elif headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
                    why = "cross-site request"
            if why:
                from starlette.responses import PlainTextResponse

                await PlainTextResponse(f"forbidden: {why}\n", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def create_app(session: CleanSession, host: str = "127.0.0.1", port: int = 8765):
    """The cleaner's Starlette app: page, state, decisions, and the data's own images (nothing else)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    root = session.root
    security = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store"}
    page_headers = {**security, "X-Frame-Options": "DENY",
                    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; "
                                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"}

    def static(name: str, media: str):
        def endpoint(request: Request) -> Response:
            return Response((WEB / name).read_bytes(), media_type=media, headers=page_headers)
        return endpoint

    def state(request: Request) -> Response:
        return JSONResponse(session.state(), headers=security)

    async def decide(request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("application/json"):
            return PlainTextResponse("send JSON\n", status_code=415)
        try:
            body = await request.json()
            name, action = str(body["name"]), str(body["action"])
            label = str(body.get("label") or "")
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "expected JSON {name, action, label}"}, status_code=400)
        try:
            item = session.decisions.decide(name, action, label)
        except KeyError:
            return JSONResponse({"error": f"{name!r} is not an image of this data set"}, status_code=404)
        except ValueError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except OSError as e:
            return JSONResponse({"error": f"cannot save the decision: {e}"}, status_code=500)
        return JSONResponse({"item": item, "summary": session.decisions.summary()}, headers=security)

    def image(request: Request) -> Response:
        from ursa.errors import ImageError
        from ursa.vision.images import open_image

        name = request.query_params.get("path", "")
        i = session.index.get(name)
        if i is None:
            return PlainTextResponse("not an image of this data set\n", status_code=404)
        path = session.files[i]
        if not _inside(path, root):  # a symlink that leads out of DATA
            return PlainTextResponse("outside the data folder\n", status_code=403)
        try:
            data = path.read_bytes()
            im, info = open_image(data, min_size=64, with_info=True)
        except (OSError, ImageError):
            return PlainTextResponse("unreadable image\n", status_code=415)
        media = CONTENT_TYPES.get(info.format)
        if media is None:  # TIFF and the like: browsers cannot show them, send a PNG of it
            buf = io.BytesIO()
            open_image(data).save(buf, "PNG")
            data, media = buf.getvalue(), "image/png"
        return Response(data, media_type=media, headers={**security, "Cache-Control": "private, max-age=300"})

    routes = [
        Route("/", static("clean.html", "text/html; charset=utf-8")),
        Route("/clean.js", static("clean.js", "text/javascript; charset=utf-8")),
        Route("/clean.css", static("clean.css", "text/css; charset=utf-8")),
        Route("/api/state", state),
        Route("/api/decide", decide, methods=["POST"]),
        Route("/image", image),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
    ]
    app = Starlette(routes=routes)
    return _Guard(app, allowed_hosts(host, port), any_ip=host in ("0.0.0.0", "::", ""))


# ---------------------------------------------------------------------------------------------
# Entry points for the CLI.


def prepare(data: Path, model_path: Path, csv_path: Path | None = None, threshold: float = DUP_THRESHOLD,
            quiet: bool = False, console=None, timings: dict[str, float] | None = None) -> tuple[Any, Scores, Rankings]:
    """Load data and model, score every item (with a progress bar) and rank: the shared first half."""
    from rich.console import Console

    from ursa.vision.data import load_dataset
    from ursa.inference.modelfile import load_model
    from ursa.util.progress import progress_bar

    console = console or Console(stderr=True, quiet=quiet)
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    ds = load_dataset(data, csv_path)
    model, meta = load_model(model_path)
    t1 = time.perf_counter()
    with progress_bar(console, quiet) as prog:
        task = prog.add_task("predictions and embeddings", total=len(ds))
        scores = score_dataset(ds, model, meta, progress=lambda k: prog.update(task, advance=k))
    t2 = time.perf_counter()
    ranks = rank(scores, threshold)
    timings.update(load=t1 - t0, model_pass=t2 - t1, rankings=time.perf_counter() - t2)
    return ds, scores, ranks


def summary_line(scores: Scores, ranks: Rankings) -> str:
    """One line for the terminal: how much there is to look at."""
    n_exact = sum(p.exact for p in ranks.duplicates)
    n_cl = int(ranks.confident.sum()) if ranks.confident is not None else 0
    return (f"{len(scores.names)} images, {len(scores.classes)} classes: {_n(len(ranks.issues), 'likely label error')} "
            f"({n_cl} flagged by confident learning), {_n(len(ranks.duplicates), 'duplicate pair')} ({n_exact} exact), "
            f"{len(scores.unreadable)} unreadable")


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


def free_port_or_error(host: str, port: int) -> None:
    """Fail early with a clear message when the port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UrsaError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port") from None


def check_writable(root: Path, csv_path: Path | None = None) -> None:
    """Refuse, before the slow pass, a folder the cleaner cannot write to or a cleaned.csv it did not write."""
    root = Path(root)
    if not os.access(root, os.W_OK):
        raise UrsaError(f"{root}: folder is read-only; the cleaner saves cleaned.csv and clean_log.csv there "
                        "(copy the folder, or use --export DIR to only write the rankings)")
    cleaned, log_path = root / CLEANED_NAME, root / LOG_NAME
    is_input = csv_path is not None and Path(csv_path).resolve() == cleaned.resolve()
    if cleaned.exists() and not log_path.exists() and not is_input:
        raise UrsaError(f"{cleaned} exists but {LOG_NAME} does not, so ursa clean did not write it and will not "
                        f"overwrite it: start from it with --csv {cleaned}, or move it aside")


def start_session(ds, scores: Scores, ranks: Rankings, model_name: str = "", csv_path: Path | None = None) -> CleanSession:
    """Replay the log and sync cleaned.csv with it; refuses data folders it cannot write to."""
    root = Path(ds.root)
    check_writable(root, csv_path)
    decisions = Decisions(root, scores.names, [scores.classes[k] for k in scores.labels], scores.classes)
    decisions.load()
    if decisions.skipped_rows:
        log.warning("%s: %d damaged row(s) ignored (or naming a class the data no longer has)",
                    decisions.log_path, decisions.skipped_rows)
    if decisions.log_path.exists():
        decisions.write_cleaned()  # the log is the truth: bring cleaned.csv in line after any crash
    return CleanSession(root, list(ds.files), scores, ranks, decisions, list(ds.is_valid), model_name)


def serve(session: CleanSession, host: str = "127.0.0.1", port: int = 8765, open_browser: bool = True,
          echo: Callable[[str], None] = print) -> None:
    """Run the cleaner until Ctrl+C; decisions are already on disk, so stopping loses nothing."""
    import uvicorn

    free_port_or_error(host, port)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}/"
    app = create_app(session, host, port)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    if open_browser:
        def _open() -> None:
            import webbrowser

            for _ in range(100):
                if server.started:
                    webbrowser.open(url)
                    return
                time.sleep(0.05)
        threading.Thread(target=_open, daemon=True).start()
    s = session.decisions.summary()
    echo(f"cleaner at {url} (Ctrl+C to stop); {s['decided']} decision(s) so far")
    echo(f"decisions save to {session.decisions.cleaned_path} and {session.decisions.log_path}")
    server.run()
    echo(f"retrain on the cleaned set: ursa train {session.root} --csv {session.decisions.cleaned_path}")
