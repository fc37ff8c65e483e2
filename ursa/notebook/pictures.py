"""Pictures in a notebook: PNG bytes that show themselves inline (``_repr_png_``), and the one rule for showing.

Every picture the notebook API makes (show_batch, the LR finder, the confusion matrix, the top
losses) is a matplotlib figure or PIL image drawn by the same code that writes the run folder's
PNG files (``ursa.diagnose.plots``, ``ursa.vision.show``), turned into PNG bytes here. In a
notebook ``show`` displays it at once and returns None (fastai's way: no second copy when it is
the cell's last line); elsewhere it returns the picture, to save or look at.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

from ursa.util.files import atomic_write_bytes


class Picture:
    """A PNG image that a notebook displays inline."""

    def __init__(self, png: bytes, title: str = "") -> None:
        self.png, self.title = png, title

    @classmethod
    def from_figure(cls, fig: Any, title: str = "") -> "Picture":
        """A matplotlib figure (ursa's are on the Agg canvas) as PNG."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return cls(buf.getvalue(), title)

    @classmethod
    def from_image(cls, im: Any, title: str = "") -> "Picture":
        """A PIL image as PNG."""
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return cls(buf.getvalue(), title)

    def _repr_png_(self) -> bytes:
        return self.png

    def save(self, path: str | Path) -> Path:
        """Write the PNG (atomically)."""
        atomic_write_bytes(Path(path), self.png)
        return Path(path)

    def __repr__(self) -> str:
        return f"Picture({self.title or 'PNG'}, {len(self.png)} bytes)"


def in_notebook() -> bool:
    """True inside an IPython kernel (Jupyter, JupyterLab, VS Code): never imports IPython to find out."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def show(obj: Any) -> Any:
    """Display obj now in a notebook and return None; elsewhere return obj."""
    if in_notebook():
        from IPython.display import display

        display(obj)
        return None
    return obj
