"""A studio project: a folder of class folders, the same one `ursa train PROJECT` reads.

The class folders are the project: there is no database beside them. Images arrive as whole
files (``write_new``: fsynced under a temp name, then linked into place, never over another
file), so a killed studio loses at most the image being written. Bytes that do not decode go to
verify's quarantine with a row in verify.csv (``quarantine_bytes``). Removing a class moves its
folder to ``_removed/`` (a folder training skips): nothing is ever deleted.
"""

from __future__ import annotations

import os
import re
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ursa.acquire.verify import quarantine_bytes
from ursa.errors import ImageError, UrsaError
from ursa.util.files import temp_target, write_new
from ursa.vision.data import SKIP_DIRS
from ursa.vision.dedupe import ImageHash, image_hash, near_pairs
from ursa.vision.images import IMAGE_EXTENSIONS, check_image

REMOVED = "_removed"  # where removed classes go (training skips folders starting with _)
MAX_CLASS_NAME = 80
SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


class ProjectError(UrsaError):
    """A class name or request the project cannot take (the page shows the line)."""


@dataclass(frozen=True)
class Added:
    """What happened to one image sent to the project."""

    name: str  # file name in the class folder, or the quarantined path
    ok: bool
    reason: str = ""
    duplicate_of: str = ""  # a near-duplicate already in the project (class/name)

    def to_json(self) -> dict:
        return {"name": self.name, "ok": self.ok, "reason": self.reason, "duplicate_of": self.duplicate_of}


def check_class_name(name: str) -> str:
    """The name as a folder name training reads as a class, or ProjectError saying what to change."""
    name = unicodedata.normalize("NFC", str(name)).strip()
    if not name or len(name) > MAX_CLASS_NAME:
        raise ProjectError(f"a class name has 1 to {MAX_CLASS_NAME} characters, got {len(name)}")
    if name[0] in "._" or name in SKIP_DIRS or name == REMOVED:
        raise ProjectError(f"{name!r}: a class name may not start with '.' or '_' (training skips such folders)")
    if any(c in name for c in "/\\:") or any(unicodedata.category(c)[0] == "C" for c in name):
        raise ProjectError(f"{name!r}: a class name may not hold '/', '\\', ':' or control characters")
    return name


def safe_file_name(name: str, fmt: str) -> str:
    """A plain file name for an upload: its own stem (letters, digits, - and _ kept) and the suffix its bytes call for
    (fmt "" for bytes that do not decode: the name's own suffix)."""
    given = Path(str(name).replace("\\", "/"))
    stem = re.sub(r"[^\w-]+", "-", given.stem, flags=re.ASCII).strip("-_")[:60]
    suffix = SUFFIX.get(fmt) or (given.suffix.lower() if re.fullmatch(r"\.\w{1,8}", given.suffix, re.ASCII) else ".bin")
    return (stem or "image") + suffix


SIDECARS = frozenset({"thumbs.db", "desktop.ini", "icon\r"})  # what file managers leave in any folder


def not_a_project(root: Path, look: int = 200) -> str:
    """Why ROOT is no project folder ("" when it may be one): the file system's root, the home folder, or a folder
    whose sub-folders hold files but no images (Documents, Music: they would show as empty classes, and the page can
    move a class folder aside). A missing or empty folder is a new project; a sub-folder holding only folders
    (train/ and valid/ of class folders) or only a file manager's sidecar files is no evidence either way.
    Reads at most ``look`` names per folder."""
    try:
        where = root.resolve()
        home = Path.home().resolve()
    except (OSError, RuntimeError):
        return ""
    if where == Path(where.anchor) or where == home:
        return "the home folder" if where == home else "the root of the file system"
    if not where.is_dir():
        return ""
    try:
        with os.scandir(where) as it:
            subs = [e for e in it if e.name[0] not in "._" and e.name not in SKIP_DIRS and e.is_dir(follow_symlinks=False)]
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    others = []
    for e in subs[:look]:
        try:
            with os.scandir(e.path) as it:
                files = [f.name for _, f in zip(range(look), it)
                         if f.name[0] != "." and f.name.lower() not in SIDECARS and not f.is_dir()]
        except OSError:
            continue
        if files and not any(os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS for n in files):
            others.append(e.name)
    if others:
        return f"its sub-folders {', '.join(sorted(others)[:3])}{' ...' if len(others) > 3 else ''} hold no images"
    return ""


class Project:
    """The folder and what the page changes in it: classes, images, quarantine; near-duplicates remembered."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hashes: dict[str, ImageHash] = {}  # "class/name" -> perceptual hash, of images added or shown
        self._lock = threading.Lock()  # renames and removals against adds in the same class
        self._frame = 0

    # ------------------------------------------------------------------ reading
    def classes(self) -> list[str]:
        """The class folders, as training reads them (not hidden, not starting with _), sorted."""
        with os.scandir(self.root) as it:
            return sorted(e.name for e in it if e.is_dir() and e.name[0] not in "._" and e.name not in SKIP_DIRS)

    def images(self, cls: str) -> list[str]:
        """File names of the images in one class folder, newest first (what was just captured shows at the top)."""
        folder = self.folder(cls)
        with os.scandir(folder) as it:
            found = [(e.stat().st_mtime_ns, e.name) for e in it
                     if e.name[0] != "." and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file()]
        return [n for _, n in sorted(found, key=lambda t: (-t[0], t[1]))]

    def counts(self) -> dict[str, int]:
        """Images per class (names only: no file is opened or stat'ed)."""
        out = {}
        for c in self.classes():
            with os.scandir(self.root / c) as it:
                out[c] = sum(1 for e in it if e.name[0] != "." and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
        return out

    def folder(self, cls: str) -> Path:
        """The folder of an existing class, or ProjectError (a folder named in NFD, as macOS writes names, is found by
        its NFC name too: the page sends names back normalised)."""
        cls = check_class_name(cls)
        path = self.root / cls
        if not path.is_dir():
            twin = self.twin(cls)
            if twin is None:
                raise ProjectError(f"no class {cls!r} in {self.root}; create it first")
            path = self.root / twin
        return path

    def twin(self, name: str, besides: str = "") -> str | None:
        """The existing class whose name differs from NAME only in Unicode normalisation (never BESIDES), or None."""
        key = unicodedata.normalize("NFC", name)
        return next((c for c in self.classes() if c != besides and unicodedata.normalize("NFC", c) == key), None)

    def image_path(self, cls: str, name: str) -> Path:
        """An image of the project by class and file name, never a path from outside it."""
        path = self.folder(cls) / name  # checked by name, not by listing the folder: one stat per thumbnail
        if ("/" in name or "\\" in name or not name or name.startswith(".") or name in (".", "..")
                or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS or not path.is_file()):
            raise ProjectError(f"{cls}/{name}: not an image of this project")
        if not path.resolve().is_relative_to(self.root.resolve()):  # a link that leads out of the project
            raise ProjectError(f"{cls}/{name}: a link to a file outside the project; not shown")
        return path

    def sweep(self, min_age: float = 10.0) -> list[Path]:
        """Remove what a killed studio left mid-write: write_new's temp files for images in class folders, nothing else."""
        gone, now = [], time.time()
        for cls in self.classes():
            for p in (self.root / cls).glob(".*.tmp"):
                target = temp_target(p.name)
                if (target and Path(target).suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.is_symlink()
                        and now - p.stat().st_mtime >= min_age):
                    p.unlink()
                    gone.append(p)
        return gone

    # ------------------------------------------------------------------ changing
    def create(self, name: str) -> str:
        """A new, empty class folder; ProjectError when it exists."""
        name = check_class_name(name)
        try:
            if self.twin(name) is not None:  # "café" beside "cafe\u0301": two classes that print the same
                raise FileExistsError
            (self.root / name).mkdir()
        except FileExistsError:
            raise ProjectError(f"class {name!r} exists already") from None
        return name

    def rename(self, old: str, new: str) -> str:
        """Rename a class folder (one rename: its images move with it); never onto an existing class."""
        src, new = self.folder(old), check_class_name(new)
        dst, old = self.root / new, src.name
        with self._lock:
            if dst.exists() or self.twin(new, besides=old) is not None:
                raise ProjectError(f"class {new!r} exists already; pick another name")
            os.rename(src, dst)
            self.hashes = {(new + k[len(old):] if k.startswith(old + "/") else k): h for k, h in self.hashes.items()}
        return new

    def remove(self, cls: str) -> Path:
        """Move a class folder to _removed/CLASS-TIME/ (training skips it; move it back to restore it). Returns where."""
        src = self.folder(cls)
        cls, stamp = src.name, time.strftime("%Y%m%d-%H%M%S")
        with self._lock:
            dst = self.root / REMOVED / f"{cls}-{stamp}"
            n = 1
            while dst.exists():
                n += 1
                dst = self.root / REMOVED / f"{cls}-{stamp}-{n}"
            dst.parent.mkdir(exist_ok=True)
            os.rename(src, dst)
            self.hashes = {k: h for k, h in self.hashes.items() if not k.startswith(cls + "/")}
        return dst

    def add(self, cls: str, data: bytes, name: str = "") -> Added:
        """One image into a class folder, whole or not at all; broken bytes to the quarantine with the reason."""
        folder = self.folder(cls)
        try:
            info = check_image(data)
        except ImageError as e:
            kept = quarantine_bytes(self.root, f"{folder.name}/{safe_file_name(name or 'upload', '')}", data, e)
            return Added(kept, False, f"{e.kind}: {e.reason}")
        if not name:
            self._frame += 1
            name = f"cam-{time.strftime('%Y%m%d-%H%M%S')}-{self._frame:04d}"
        with self._lock:
            if not folder.is_dir():  # removed or renamed since it was looked up: write_new would make it again
                raise ProjectError(f"no class {folder.name!r} in {self.root} any more (removed or renamed)")
            written = write_new(folder / safe_file_name(name, info.format), data)
        key = f"{folder.name}/{written.name}"
        return Added(written.name, True, duplicate_of=self.remember(key, data))

    def remember(self, key: str, data: bytes | Path) -> str:
        """Hash an image the studio has seen; the class/name of a near-duplicate already remembered, or ""."""
        try:
            h = image_hash(data)
        except (ImageError, OSError):
            return ""
        keys = [k for k in self.hashes if k != key]
        pairs = near_pairs([h] + [self.hashes[k] for k in keys], allowed=lambda i, j: i == 0)
        self.hashes[key] = h
        return keys[pairs[0].j - 1] if pairs else ""

    def leakage(self, limit: int = 50) -> list[list[str]]:
        """Near-duplicates remembered in two different classes: the same picture labelled twice (class/name pairs)."""
        keys = list(self.hashes)
        cls = [k.split("/", 1)[0] for k in keys]
        pairs = near_pairs([self.hashes[k] for k in keys], allowed=lambda i, j: cls[i] != cls[j])
        return [[keys[p.i], keys[p.j]] for p in pairs[:limit]]
