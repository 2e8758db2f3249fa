"""The fact table the ``lookup`` tool reads and the lookup episodes ask about.

Made-up towns with made-up numbers, drawn from a fixed seed: a model cannot know them from pretraining or
from any real text, so a held-out question about one is answered right only by calling the tool and
copying its result. The table is code, not a download; :func:`fact_table` with the same arguments gives
the same table in every process, and the data generator and the evaluation's tool use the same default.

A key is ``"<Town> <attribute>"`` (e.g. ``"Velmora population"``); :func:`normalise_key` makes lookups
insensitive to case and spacing.
"""

from __future__ import annotations

import random
import re
from types import MappingProxyType
from typing import Mapping

FACTS_SEED = 20251203
N_TOWNS = 48

# attribute -> (question templates, value range). Every value is an integer, so answers are checked
# exactly like the calculator's ("The answer is N.").
ATTRIBUTES: dict[str, tuple[tuple[str, ...], tuple[int, int]]] = {
    "population": (
        ("What is the population of {town}?", "How many people live in {town}?"),
        (1000, 99999),
    ),
    "founded": (
        ("In what year was {town} founded?", "When was {town} founded?"),
        (1100, 1999),
    ),
    "tower": (
        ("How tall is the tower of {town} in meters?", "What is the height of the {town} tower?"),
        (20, 400),
    ),
}

_ONSETS = ("B", "D", "F", "G", "K", "L", "M", "N", "P", "R", "S", "T", "V", "Z", "Br", "Dr", "Gl", "Kr", "St", "Tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_ENDINGS = ("mora", "vik", "dale", "stead", "holm", "wick", "gard", "ton", "bury", "mont", "ford", "lin")


def normalise_key(key: str) -> str:
    """Case- and whitespace-insensitive form of a lookup key ("  velmora   Population" -> "velmora population")."""
    return re.sub(r"\s+", " ", key.strip()).lower()


def town_names(seed: int = FACTS_SEED, n: int = N_TOWNS) -> tuple[str, ...]:
    """``n`` distinct made-up town names (syllable onset + vowel + ending), deterministic in ``seed``."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n:
        name = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_ENDINGS)
        if name not in names:
            names.append(name)
    return tuple(names)


def fact_table(seed: int = FACTS_SEED, n_towns: int = N_TOWNS) -> Mapping[str, str]:
    """Read-only ``{normalised key: value}`` for every town and attribute (values are decimal integers)."""
    rng = random.Random(seed + 1)
    table: dict[str, str] = {}
    for town in town_names(seed, n_towns):
        for attribute, (_, (low, high)) in ATTRIBUTES.items():
            table[normalise_key(f"{town} {attribute}")] = str(rng.randint(low, high))
    return MappingProxyType(table)
