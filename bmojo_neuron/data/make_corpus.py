"""Generate the small English-like corpus shipped in ``bmojo_neuron/data/corpus/``.

Deterministic (fixed seeds) and download-free: a tiny grammar writes stories where
people move objects between places and later ask where they are (long-range
recall), arithmetic and counting facts (exact, learnable rules) and short scene
descriptions (local syntax). Run ``python -m bmojo_neuron.data.make_corpus`` to
rewrite the files; the output is identical on every run.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Callable

NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "June", "Kai", "Lena", "Mara", "Nils"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "gray"]
OBJECTS = ["cup", "ball", "key", "book", "hat", "lamp", "box", "coin", "shoe", "pen", "bag", "map", "clock", "kite"]
PLACES = ["kitchen", "garden", "hall", "attic", "garage", "bedroom", "office", "cellar", "porch", "library"]
ADJECTIVES = ["old", "small", "large", "quiet", "bright", "dusty", "warm", "cold", "narrow", "wide"]
SCENES = ["river", "hill", "market", "bridge", "forest", "harbor", "station", "field", "tower", "lake"]
VERBS_MOVE = ["put", "left", "placed", "dropped", "hid"]
NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
FILES = {"stories.txt": 140_000, "arithmetic.txt": 90_000, "counting.txt": 80_000, "scenes.txt": 90_000}


def story(rng: random.Random) -> str:
    """People move objects between places; questions at the end test what happened long before."""
    people = rng.sample(NAMES, 3)
    things = [f"{c} {o}" for c, o in zip(rng.sample(COLORS, 4), rng.sample(OBJECTS, 4))]
    where: dict[str, str] = {}
    lines = [f"{people[0]}, {people[1]} and {people[2]} were at home."]
    for _ in range(rng.randint(6, 12)):
        who, thing, place = rng.choice(people), rng.choice(things), rng.choice(PLACES)
        if rng.random() < 0.3:
            lines.append(f"{who} walked to the {rng.choice(PLACES)}.")
            continue
        verb = rng.choice(VERBS_MOVE)
        lines.append(f"{who} {verb} the {thing} in the {place}.")
        where[thing] = place
    for thing in rng.sample(sorted(where), min(3, len(where))):
        lines.append(f"Where is the {thing}? The {thing} is in the {where[thing]}.")
    return " ".join(lines)


def arithmetic(rng: random.Random) -> str:
    """Sums and differences in words and digits, always correct."""
    lines = []
    for _ in range(rng.randint(4, 8)):
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        if rng.random() < 0.5:
            lines.append(f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
        elif a >= b:
            lines.append(f"{a} - {b} = {a - b}.")
        else:
            lines.append(f"{a} + {b} = {a + b}.")
    return " ".join(lines)


def counting(rng: random.Random) -> str:
    """A basket of objects and its total, plus a short count-up."""
    counts = {o: rng.randint(1, 5) for o in rng.sample(OBJECTS, rng.randint(2, 4))}
    parts = [f"{NUMBERS[n]} {o}{'s' if n > 1 else ''}" for o, n in counts.items()]
    listed = ", ".join(parts[:-1]) + f" and {parts[-1]}"
    place = rng.choice(PLACES)
    total = sum(counts.values())
    start = rng.randint(1, 10)
    count_up = ", ".join(NUMBERS[start : start + rng.randint(3, 6)])
    verb = "is" if next(iter(counts.values())) == 1 else "are"
    return f"In the {place} there {verb} {listed}. In all there are {NUMBERS[total]} things. Counting: {count_up}."


def scene(rng: random.Random) -> str:
    """Short descriptions with agreement between subject and pronoun."""
    lines = []
    for _ in range(rng.randint(2, 4)):
        adj, color, obj, spot = rng.choice(ADJECTIVES), rng.choice(COLORS), rng.choice(OBJECTS), rng.choice(SCENES)
        name = rng.choice(NAMES)
        lines.append(f"The {adj} {color} {obj} is near the {spot}. It is {rng.choice(ADJECTIVES)}.")
        lines.append(f"{name} sees the {obj} and takes it to the {rng.choice(SCENES)}.")
    return " ".join(lines)


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "stories.txt": story,
    "arithmetic.txt": arithmetic,
    "counting.txt": counting,
    "scenes.txt": scene,
}


def make_file(name: str, target_bytes: int, seed: int) -> str:
    """Paragraphs from the file's generator until `target_bytes` is reached."""
    rng = random.Random(f"{seed}:{name}")
    paragraphs: list[str] = []
    size = 0
    while size < target_bytes:
        paragraphs.append(GENERATORS[name](rng))
        size += len(paragraphs[-1]) + 2
    return "\n\n".join(paragraphs) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Write the corpus files (default: next to this module)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "corpus")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, size in FILES.items():
        (args.out / name).write_text(make_file(name, size, args.seed), encoding="utf-8")


if __name__ == "__main__":
    main()
