"""Thumbnails made when the page asks for them (only the visible ones), kept in a bounded in-memory cache.

Nothing is written to disk: the project folder holds the user's images and nothing of the page's.
A JPEG is decoded at reduced scale (``open_image``'s draft), so a thumbnail of a 12-megapixel
photo costs a fraction of its full decode.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

from ursa.vision.images import open_image

SIDE = 128  # pixels, the long side of a thumbnail (the page shows them at 96 css px; sharp on 1.3x screens)


class Thumbs:
    """JPEG thumbnails by (path, modification time), the least recently used dropped past ``capacity``."""

    def __init__(self, side: int = SIDE, capacity: int = 4000) -> None:
        self.side, self.capacity = side, capacity
        self.cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.made = 0  # thumbnails decoded (a cache hit makes none)
        self._lock = threading.Lock()

    def get(self, path: Path) -> bytes:
        """The thumbnail of an image file (ImageError or OSError when it does not decode)."""
        key = (str(path), path.stat().st_mtime_ns)
        with self._lock:
            data = self.cache.get(key)
            if data is not None:
                self.cache.move_to_end(key)
                return data
        im = open_image(path, max_side=self.side)
        im.thumbnail((self.side, self.side))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
        data = buf.getvalue()
        with self._lock:
            self.made += 1
            self.cache[key] = data
            while len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
        return data
