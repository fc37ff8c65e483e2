"""Names as people see them: file and class names that are not UTF-8, or hold a newline, shown on one line.

A name on disk may be any bytes but ``/`` and NUL. Python hands a name that is not valid UTF-8
over surrogate-escaped (PEP 383: byte 0xE9 becomes U+DCE9), which no UTF-8 console or file can
write, and a name may hold a newline or another control character that would split a line of
output in two. ``printable`` is the one visible escape for both: ``\\xe9`` for a raw byte,
``\\n``, ``\\t``, ``\\x1b``... for control characters, and the name untouched otherwise (the common
case costs one ``str.isprintable``). Files ursa reads back keep the real bytes instead
(``util.files.NAME_ERRORS``); hashing uses ``os.fsencode``.
"""

from __future__ import annotations

import codecs
import html
import unicodedata

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(ch: str) -> str:
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:  # a raw byte of a name that is not UTF-8
        return f"\\x{o - 0xDC00:02x}"
    if ch in _SHORT:
        return _SHORT[ch]
    if ch == " " or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Zl", "Zp", "Co", "Cn"):
        return ch  # letters, marks, digits, punctuation, symbols and spaces as they are
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def printable(name: str) -> str:
    """The name on one line, every byte visible: raw bytes as \\xNN, control and line-break characters escaped."""
    if name.isprintable():
        return name
    return "".join(_escaped(ch) for ch in name)


def html_text(value: object) -> str:
    """Any value as HTML text, quotes escaped too: raw bytes and control characters visible as in `printable`,
    but newlines and tabs kept (HTML lays them out as spaces; a message may hold them)."""
    text = str(value)
    if not text.isprintable():
        text = "".join(ch if ch in _SHORT else _escaped(ch) for ch in text)
    return html.escape(text, quote=True)


def same_when_normalised(names: list[str]) -> tuple[str, str] | None:
    """Two names that differ only in Unicode normalisation ("café" as NFC and as NFD), or None.

    They look the same everywhere they are printed, so as two classes they would be a trap.
    """
    seen: dict[str, str] = {}
    for n in names:
        key = unicodedata.normalize("NFC", n)
        if key in seen and seen[key] != n:
            return seen[key], n
        seen.setdefault(key, n)
    return None


ERRORS = "ursa.names"  # an encoding error handler: a console stream writes surrogate-escaped bytes as \xNN


def _encode_error(e: UnicodeError) -> tuple[str, int]:
    if not isinstance(e, UnicodeEncodeError):
        raise e
    bad = e.object[e.start:e.end]  # raw bytes of a name as \xNN; anything else the console cannot show as \uNNNN
    return "".join(f"\\x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF
                   else ch.encode("ascii", "backslashreplace").decode("ascii") for ch in bad), e.end


codecs.register_error(ERRORS, _encode_error)
