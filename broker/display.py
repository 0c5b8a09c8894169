"""What a person is shown of agent-controlled text: every character that could hide, reorder or
fake what they read is made visible, in one way, on every surface where a human decides.

The stored value stays exact (it is what the approval's hash binds); only its rendering changes.
A character is *marked* when a person could not see it, or could not tell it from another:

- bidirectional controls (U+202A-202E, U+2066-2069, U+200E/200F, U+061C) and every other
  format character (Unicode category Cf: zero-width space/joiners U+200B-200D, word joiner and
  invisible operators U+2060-2064, U+FEFF, soft hyphen U+00AD, Mongolian vowel separator U+180E,
  tag characters U+E0001-E007F ...);
- control characters (Cc: C0, DEL, C1, and so newlines, tabs and terminal escapes), line and
  paragraph separators (Zl, Zp), private-use (Co), surrogates (Cs) and unassigned (Cn) code points;
- spaces other than U+0020 (Zs: no-break, em, ideographic ...): they look like a space but bind
  something else;
- invisible letters and marks that are not Cf: combining grapheme joiner U+034F, Hangul fillers
  U+115F, U+1160, U+3164, U+FFA0, Khmer inherent vowels U+17B4/17B5, Mongolian free variation
  selectors U+180B-180F, variation selectors U+FE00-FE0F and U+E0100-E01EF, braille blank U+2800;
- the opening mark itself (U+27E6), so that the rendering is one-to-one: text that spells
  `⟦U+202E⟧` literally is shown as `⟦U+27E6⟧U+202E⟧`, never as if it held the control.

A marked character is shown as `⟦U+202E⟧`. Plain-text surfaces (CLI, notification `display`)
use `visible`; the console wraps each mark in `<mark>` with the character's name (`segments`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "\u27e6", "\u27e7"

# Categories whose every member is marked. Cf covers bidi controls, zero-width characters,
# U+FEFF, U+00AD, U+180E and the tag characters, whatever Unicode version Python ships.
_MARKED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

# Invisible (or blank-looking) code points outside those categories.
_INVISIBLE = frozenset(
    {0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFFA0, ord(OPEN)}
    | set(range(0x180B, 0x1810))
    | set(range(0xFE00, 0xFE10))
    | set(range(0xE0100, 0xE01F0))
)

BIDI_CONTROLS = frozenset({0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)})


def is_marked(char: str) -> bool:
    """Whether a person must be shown this character as a mark rather than as itself."""
    if char == " ":
        return False
    code = ord(char)
    if code in _INVISIBLE:
        return True
    category = unicodedata.category(char)
    return category in _MARKED_CATEGORIES or category == "Zs"


def mark(char: str) -> str:
    return f"{OPEN}U+{ord(char):04X}{CLOSE}"


def name_of(char: str) -> str:
    """A person-readable name for a marked character (the console's tooltip)."""
    fallback = {0x0A: "LINE FEED", 0x0D: "CARRIAGE RETURN", 0x09: "CHARACTER TABULATION", 0x1B: "ESCAPE",
                0x7F: "DELETE"}.get(ord(char))
    kind = "right-to-left or direction control" if ord(char) in BIDI_CONTROLS else unicodedata.category(char)
    return f"{unicodedata.name(char, fallback or 'UNNAMED CHARACTER')} ({kind})"


def visible(text: str) -> str:
    """`text` with every marked character shown as `⟦U+XXXX⟧`; other characters unchanged."""
    if all(not is_marked(c) for c in text):
        return text
    return "".join(mark(c) if is_marked(c) else c for c in text)


@dataclass(frozen=True)
class Segment:
    text: str
    marked: bool  # True: `text` is one marked character's `⟦U+XXXX⟧`
    name: str = ""


def segments(text: str) -> Iterator[Segment]:
    """`visible(text)` in pieces, so an HTML surface can highlight each mark."""
    plain: list[str] = []
    for char in text:
        if is_marked(char):
            if plain:
                yield Segment("".join(plain), False)
                plain = []
            yield Segment(mark(char), True, name_of(char))
        else:
            plain.append(char)
    if plain:
        yield Segment("".join(plain), False)


def hidden_characters(value: Any) -> list[str]:
    """Every marked character anywhere in a JSON value (keys included), as `U+XXXX`, in order of
    first appearance. Empty: nothing in it needed marking."""
    found: dict[str, None] = {}
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            for char in node:
                if is_marked(char):
                    found.setdefault(f"U+{ord(char):04X}")
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return list(found)
