"""Code points that hide, reorder or fake what a person reads ("Trojan Source", CVE-2021-42574
and its relatives), by class: the corpus every human surface is tested with."""

from __future__ import annotations

HOSTILE: dict[str, list[int]] = {
    "bidi-embedding-override": [0x202A, 0x202B, 0x202C, 0x202D, 0x202E],
    "bidi-isolate": [0x2066, 0x2067, 0x2068, 0x2069],
    "bidi-mark": [0x200E, 0x200F, 0x061C],
    "zero-width": [0x200B, 0x200C, 0x200D, 0xFEFF],
    "word-joiner-invisible-operators": [0x2060, 0x2061, 0x2062, 0x2063, 0x2064],
    "soft-hyphen-mongolian-cgj": [0x00AD, 0x180E, 0x034F],
    "tag-characters": [0xE0001, 0xE0020, 0xE0041, 0xE007F],
    "variation-selectors": [0xFE00, 0xFE0F, 0xE0100, 0xE01EF, 0x180B],
    "hangul-fillers": [0x115F, 0x1160, 0x3164, 0xFFA0],
    "other-format": [0x0600, 0xFFF9, 0x1D173, 0x17B4, 0x2800],
    "controls": [0x0000 + 0x07, 0x1B, 0x7F, 0x85, 0x9B, 0x0A, 0x0D, 0x09],
    "line-paragraph-separators": [0x2028, 0x2029],
    "look-alike-spaces": [0x00A0, 0x2000, 0x2007, 0x202F, 0x205F, 0x3000],
    "private-use-unassigned": [0xE000, 0xF8FF, 0x0378],
    "the-mark-itself": [0x27E6],
}

ALL = [(kind, code) for kind, codes in HOSTILE.items() for code in codes]
# One of each class: what the slower (end-to-end) tests carry.
ONE_PER_CLASS = [(kind, codes[0]) for kind, codes in HOSTILE.items()]


def marked(code: int) -> str:
    """How every surface must show `code`."""
    return f"\u27e6U+{code:04X}\u27e7"


def ids(cases: list[tuple[str, int]]) -> list[str]:
    return [f"{kind}-U+{code:04X}" for kind, code in cases]
