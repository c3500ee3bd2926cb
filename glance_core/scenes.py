"""Scenes made in code and an exact prompt-following score: the reference teacher's data and its GenEval.

A scene is 1–3 flat shapes (circle, square, triangle) in 6 colours and random sizes on a light background, one per
cell of a 2 × 2 layout with some jitter (so objects never touch), described by a caption of plain words. Six kinds
of caption, one per score category:

==================  ======================================  =============================================
category            caption                                 the image is right when it shows
==================  ======================================  =============================================
single object       ``a triangle``                          exactly one object, a triangle (any colour)
colour              ``a red circle``                        exactly one object, a red circle
two objects         ``a circle and a square``               exactly two objects, those shapes
counting            ``three blue squares``                  exactly that many, all that colour and shape
colour attribution  ``a red circle and a blue square``      exactly two objects, each its colour and shape
position            ``a red circle left of a blue square``  both objects, the first one there of the second
==================  ======================================  =============================================

Some compositions are never drawn in training (``HELD_OUT_PAIRS`` of colour and shape, ``HELD_OUT_RELATIONS`` of
shape, relation, shape): ``held_out_captions`` asks for them, ``seen_captions`` for compositions training drew.

The score finds the objects procedurally: each pixel takes the nearest palette colour (or none, when far from
all), connected components of one colour are objects, and a component's shape is read from its bounding box: an
upright triangle has a third of its area above the box's middle, a square fills the box up to its corners, a circle
does not reach them. Numpy and scipy only: the demo, the benchmark and the training script share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

SIZE = 32
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.98, 0.85, 0.05),
    "purple": (0.55, 0.15, 0.75),
    "cyan": (0.05, 0.80, 0.85),
}
BACKGROUND = (0.93, 0.93, 0.90)
SHAPES = ("circle", "square", "triangle")
PLURAL = {s: s + "s" for s in SHAPES}
NUMBERS = {"two": 2, "three": 3}
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single object", "colour", "two objects", "counting", "colour attribution", "position")
#: How often training draws each category (relative): the two-object kinds, where a small model has to bind words to
#: objects, more often than single objects.
CATEGORY_WEIGHTS = (1.0, 1.0, 1.5, 1.0, 1.5, 2.0)
#: Colour–shape pairs never drawn in training (not even in scenes whose caption names no colour).
HELD_OUT_PAIRS = frozenset({("green", "triangle"), ("yellow", "circle"), ("purple", "square")})
#: (first shape, relation, second shape) never captioned in training (any colours).
HELD_OUT_RELATIONS = frozenset(
    {("square", "right of", "circle"), ("triangle", "above", "square"), ("circle", "below", "triangle")}
)
#: A handful of training captions, one per kind of scene: what the demo's experts and the benchmark's adapters
#: learn from (the one-caption rows use the first).
HANDFUL = (
    "a red circle left of a blue square",
    "two blue squares",
    "a red square and a blue circle",
    "a yellow square",
    "a circle and a triangle",
    "a triangle",
)
VOCAB = ["", "a", "and", "of", *NUMBERS, "left", "right", "above", "below", *COLOURS, *SHAPES, *PLURAL.values()]
#: Words in the longest caption ("a red circle left of a blue square").
MAX_WORDS = 8
#: Words that begin a phrase: a caption is at most three phrases, an object or two and what joins them
#: ("a red circle" | "left of" | "a blue square"), which the teacher takes as one context token each.
PHRASE_STARTS = ("a", *NUMBERS, "and", *(r.split()[0] for r in RELATIONS))
MAX_PHRASES = 3
#: Objects sit in the cells of a GRID × GRID layout (a 16-pixel cell is 4 × 4 of the teacher's patches): a small
#: model learns counts and relations in a few thousand steps when objects never touch.
GRID = 2
#: Radius (half the side of a square, half the base of a triangle) in pixels at SIZE: up to the largest that keeps
#: GAP to the neighbouring cell, so a shape spans 3 × 3 of the teacher's 4-pixel patches and a circle reads as round.
RADIUS = (5.0, 6.5)
GAP = 3.0  # pixels: the least space between two objects (and between an object and the edge, halved)
MIN_AREA = 6  # pixels: smaller components are specks, not objects
MARGIN = 2.0  # pixels: how far apart two centres must be for "left of" / "above" to hold


@dataclass(frozen=True)
class Obj:
    colour: str | None  # None: the caption names no colour
    shape: str


@dataclass(frozen=True)
class Spec:
    """What a caption asks for."""

    category: str
    objects: tuple[Obj, ...]
    relation: str | None = None

    @property
    def caption(self) -> str:
        o = self.objects
        name = [" ".join(w for w in (x.colour, x.shape) if w) for x in o]
        if self.category == "counting":
            number = next(k for k, v in NUMBERS.items() if v == len(o))
            return f"{number} {o[0].colour} {PLURAL[o[0].shape]}"
        if self.category in ("single object", "colour"):
            return f"a {name[0]}"
        if self.category == "position":
            return f"a {name[0]} {self.relation} a {name[1]}"
        return f"a {name[0]} and a {name[1]}"


def parse(caption: str) -> Spec:
    """The Spec of a caption in the grammar above; ValueError (naming the caption and the grammar) otherwise."""
    w = caption.lower().replace(",", " ").split()
    try:
        if len(w) == 3 and w[0] in NUMBERS and w[1] in COLOURS:
            shape = next(s for s, p in PLURAL.items() if p == w[2])
            return Spec("counting", (Obj(w[1], shape),) * NUMBERS[w[0]])
        if w[:1] == ["a"] and len(w) in (2, 3):
            return Spec("single object" if len(w) == 2 else "colour", (_obj(w[1:]),))
        for rel in RELATIONS:
            r = rel.split()
            for i in range(2, 4):
                if w[:1] == ["a"] and w[i : i + len(r)] == r and w[i + len(r)] == "a":
                    first, second = _obj(w[1:i]), _obj(w[i + len(r) + 1 :])
                    if first.colour and second.colour:
                        return Spec("position", (first, second), rel)
        if "and" in w and w[:1] == ["a"]:
            i = w.index("and")
            first, second = _obj(w[1:i]), _obj(w[i + 2 :] if w[i + 1 : i + 2] == ["a"] else ["?"])
            coloured = bool(first.colour) + bool(second.colour)
            if coloured != 1 and first.shape != second.shape:
                return Spec("colour attribution" if coloured else "two objects", (first, second))
    except (StopIteration, IndexError, ValueError):
        pass
    raise ValueError(
        f"{caption!r} is not a scene caption. Write one of: 'a triangle', 'a red circle', 'a circle and a square', "
        "'two red circles' (two or three), 'a red circle and a blue square', 'a red circle left of a blue square' "
        f"(left of, right of, above, below); colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}."
    )


def _obj(words: list[str]) -> Obj:
    if len(words) == 1 and words[0] in SHAPES:
        return Obj(None, words[0])
    if len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES:
        return Obj(words[0], words[1])
    raise ValueError(words)


# -- drawing -------------------------------------------------------------------------------------------------


@dataclass
class Placed:
    colour: str
    shape: str
    cx: float
    cy: float
    r: float


def _mask(p: Placed, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    dx, dy = xs - p.cx, ys - p.cy
    if p.shape == "circle":
        return dx * dx + dy * dy <= p.r * p.r
    if p.shape == "square":
        return (np.abs(dx) <= p.r) & (np.abs(dy) <= p.r)
    # an upright triangle: apex at the top, base 2r wide at the bottom, height 2r
    t = (dy + p.r) / (2 * p.r)  # 0 at the apex, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= p.r * t)


def draw(objects: list[Placed], size: int = SIZE, supersample: int = 4) -> np.ndarray:
    """[size, size, 3] RGB in [0, 1], antialiased by supersampling."""
    n = size * supersample
    c = (np.arange(n) + 0.5) / supersample
    xs, ys = np.meshgrid(c, c)
    img = np.empty((n, n, 3))
    img[:] = BACKGROUND
    for p in objects:
        img[_mask(p, xs, ys)] = COLOURS[p.colour]
    return img.reshape(size, supersample, size, supersample, 3).mean((1, 3))


def _cells(spec: Spec, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Distinct (column, row) cells of the GRID × GRID layout, one per object; a relation puts both objects in one
    row ("left of", "right of") or one column ("above", "below"), the first on its side."""
    if spec.relation:
        line, (near, far) = int(rng.integers(GRID)), sorted(rng.choice(GRID, 2, replace=False))
        first, second = (near, far) if spec.relation in ("left of", "above") else (far, near)
        if spec.relation in ("left of", "right of"):
            return [(first, line), (second, line)]
        return [(line, first), (line, second)]
    picks = rng.choice(GRID * GRID, len(spec.objects), replace=False)
    return [(int(k) % GRID, int(k) // GRID) for k in picks]


def _colour_for(shape: str, rng: np.random.Generator, allow_held_out: bool, avoid: set[str] = frozenset()) -> str:
    names = [c for c in COLOURS if c not in avoid and (allow_held_out or (c, shape) not in HELD_OUT_PAIRS)]
    return names[int(rng.integers(len(names)))]


def layout(spec: Spec, rng: np.random.Generator, size: int = SIZE, allow_held_out: bool = True) -> list[Placed]:
    """Objects placed for ``spec``, one per cell of a GRID × GRID layout with a random size and a jitter that
    keeps them GAP pixels apart: unnamed colours drawn at random (distinct), the relation held."""
    cell = size / GRID
    placed: list[Placed] = []
    used: set[str] = set()
    for o, (col, row) in zip(spec.objects, _cells(spec, rng)):
        colour = o.colour or _colour_for(o.shape, rng, allow_held_out, used)
        used.add(colour)
        r = float(rng.uniform(*RADIUS)) * size / SIZE
        room = max(0.0, cell / 2 - r - GAP / 2)
        cx, cy = (np.array([col, row]) + 0.5) * cell + rng.uniform(-room, room, 2)
        placed.append(Placed(colour, o.shape, float(cx), float(cy), r))
    return placed


def holds(a, relation: str, b) -> bool:
    """Whether object ``a`` (with .cx, .cy) is ``relation`` object ``b`` (image y grows downwards)."""
    if relation == "left of":
        return a.cx + MARGIN < b.cx
    if relation == "right of":
        return a.cx > b.cx + MARGIN
    if relation == "above":
        return a.cy + MARGIN < b.cy
    return a.cy > b.cy + MARGIN


# -- captions --------------------------------------------------------------------------------------------------


def _pairs(held_out: bool) -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HELD_OUT_PAIRS) == held_out]


def random_spec(rng: np.random.Generator, weights: tuple[float, ...] | None = None) -> Spec:
    """A training caption: any category (drawn by ``weights``, default ``CATEGORY_WEIGHTS``), no held-out
    colour–shape pair, no held-out relation."""
    pairs = _pairs(False)
    w = np.array(weights or CATEGORY_WEIGHTS, dtype=float)
    p = w / w.sum()
    category = CATEGORIES[int(rng.choice(len(CATEGORIES), p=p))]

    def pair() -> Obj:
        return Obj(*pairs[int(rng.integers(len(pairs)))])

    def two(distinct_shapes: bool) -> tuple[Obj, Obj]:
        while True:
            a, b = pair(), pair()
            if a.colour != b.colour and (a.shape != b.shape or not distinct_shapes):
                return a, b

    if category == "single object":
        return Spec(category, (Obj(None, SHAPES[int(rng.integers(3))]),))
    if category == "colour":
        return Spec(category, (pair(),))
    if category == "counting":
        return Spec(category, (pair(),) * int(rng.integers(2, 4)))
    if category == "two objects":
        a, b = two(True)
        return Spec(category, (Obj(None, a.shape), Obj(None, b.shape)))
    if category == "colour attribution":
        return Spec(category, two(True))
    while True:
        a, b = two(False)
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        if (a.shape, relation, b.shape) not in HELD_OUT_RELATIONS:
            return Spec(category, (a, b), relation)


def held_out_captions() -> list[str]:
    """One caption per category and held-out composition kind, none of them ever drawn in training (18)."""
    (c1, s1), (c2, s2), (c3, s3) = sorted(HELD_OUT_PAIRS)
    rel = sorted(HELD_OUT_RELATIONS)
    return [
        f"a {c1} {s1}",
        f"a {c2} {s2}",
        f"a {c3} {s3}",
        f"two {c1} {PLURAL[s1]}",
        f"three {c2} {PLURAL[s2]}",
        f"two {c3} {PLURAL[s3]}",
        f"a {c1} {s1} and a red {'circle' if s1 != 'circle' else 'square'}",
        f"a blue {'triangle' if s2 != 'triangle' else 'square'} and a {c2} {s2}",
        f"a {c3} {s3} and a cyan {'triangle' if s3 != 'triangle' else 'circle'}",
        f"a {c1} {s1} left of a blue {'square' if s1 != 'square' else 'circle'}",
        f"a red {'circle' if s2 != 'circle' else 'square'} above a {c2} {s2}",
        *(f"a {a_c} {a} {r} a {b_c} {b}" for (a, r, b), (a_c, b_c) in zip(rel, (("red", "blue"),) * 3)),
        *(f"a {a_c} {a} {r} a {b_c} {b}" for (a, r, b), (a_c, b_c) in zip(rel, (("cyan", "yellow"),) * 3)),
        f"a {c3} {s3} right of a green {'circle' if s3 != 'circle' else 'square'}",
    ]


def seen_captions() -> list[str]:
    """Captions of every category made only of compositions training draws (18)."""
    return [
        "a circle",
        "a square",
        "a triangle",
        "a red circle",
        "a blue triangle",
        "a yellow square",
        "a circle and a triangle",
        "a square and a circle",
        "two red circles",
        "three yellow triangles",
        "two blue squares",
        "a red square and a blue circle",
        "a cyan triangle and a purple circle",
        "a green circle and a yellow square",
        "a red circle left of a blue square",
        "a blue triangle below a yellow square",
        "a green square below a red triangle",
        "a purple triangle right of a cyan circle",
    ]


def is_held_out(spec: Spec) -> bool:
    """Whether the caption asks for a composition training never drew."""
    pairs = any((o.colour, o.shape) in HELD_OUT_PAIRS for o in spec.objects)
    rel = spec.relation is not None and (spec.objects[0].shape, spec.relation, spec.objects[1].shape) in (
        HELD_OUT_RELATIONS
    )
    return pairs or rel


# -- the score ------------------------------------------------------------------------------------------------


@dataclass
class Found:
    colour: str
    shape: str
    cx: float
    cy: float
    area: int
    fill: float = field(repr=False, default=0.0)


def find_objects(image: np.ndarray, tolerance: float = 0.3) -> list[Found]:
    """The objects in an [H, W, 3] image in [0, 1]: per-colour connected components, shape from the fill ratio."""
    from scipy import ndimage

    palette = np.array([BACKGROUND, *COLOURS.values()])
    d = np.linalg.norm(image[..., None, :] - palette, axis=-1)  # [H, W, 1 + colours]
    nearest = d.argmin(-1)
    nearest[d.min(-1) > tolerance] = 0  # far from every colour: not part of an object
    out = []
    for k, name in enumerate(COLOURS, start=1):
        labels, n = ndimage.label(nearest == k)
        for i in range(1, n + 1):
            ys, xs = np.nonzero(labels == i)
            if len(ys) < MIN_AREA:
                continue
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            fill = len(ys) / box
            middle = (ys.min() + ys.max()) / 2
            top, bottom = (ys < middle).sum(), (ys > middle).sum()
            mask = labels[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] == i
            corners = int(mask[0, 0]) + int(mask[0, -1]) + int(mask[-1, 0]) + int(mask[-1, -1])
            # an upright triangle has a third of its area above its middle, circles and squares half; a square
            # fills its box up to the corners, a small circle nearly fills its box but never its corners
            square = fill >= 0.95 or (fill > 0.8 and corners >= 3)
            shape = "triangle" if top < 0.6 * bottom else "square" if square else "circle"
            out.append(Found(name, shape, float(xs.mean()), float(ys.mean()), len(ys), fill))
    return out


def _match(found: Found, want: Obj) -> bool:
    return found.shape == want.shape and (want.colour is None or found.colour == want.colour)


def correct(image: np.ndarray, spec: Spec | str) -> bool:
    """Whether ``image`` shows what the caption asks (every check of its category holds)."""
    spec = parse(spec) if isinstance(spec, str) else spec
    objs = find_objects(image)
    want = spec.objects
    if len(objs) != len(want):
        return False
    if spec.category == "counting" or len(want) == 1:
        return all(_match(o, want[0]) for o in objs)
    a, b = objs
    if spec.category == "position":
        return any(
            _match(x, want[0]) and _match(y, want[1]) and holds(x, spec.relation, y) for x, y in ((a, b), (b, a))
        )
    return (_match(a, want[0]) and _match(b, want[1])) or (_match(b, want[0]) and _match(a, want[1]))


def score(images: np.ndarray, captions: list[str]) -> dict[str, float]:
    """GenEval-style accuracy: per category (the share of its images that are right) and ``overall`` = the mean over
    the categories present. ``images`` [N, H, W, 3] in [0, 1]; ``captions`` one per image."""
    hits: dict[str, list[bool]] = {}
    for img, cap in zip(images, captions):
        spec = parse(cap)
        hits.setdefault(spec.category, []).append(correct(img, spec))
    out = {c: float(np.mean(hits[c])) for c in CATEGORIES if c in hits}
    out["overall"] = float(np.mean(list(out.values()))) if out else 0.0
    return out


def relation_rate(images: np.ndarray, captions: list[str]) -> tuple[float, int]:
    """Whether a model follows the relation at all, apart from drawing the objects: over the position captions'
    images in which each named colour is found exactly once, the share where those two objects hold the relation,
    and how many such images there were."""
    found = held = 0
    for img, cap in zip(images, captions):
        spec = parse(cap)
        if spec.relation is None:
            continue
        objs = find_objects(img)
        a, b = ([o for o in objs if o.colour == want.colour] for want in spec.objects)
        if len(a) == 1 and len(b) == 1:
            found += 1
            held += holds(a[0], spec.relation, b[0])
    return (held / found if found else 0.0), found


def relation_chance(captions: list[str], samples: int = 4000, seed: int = 0) -> float:
    """``relation_rate`` of a model that draws both objects but puts them in random cells, whatever the relation
    says (the training layout otherwise): the level a teacher that ignores relations sits at."""
    rng = np.random.default_rng(seed)
    specs = [s for s in map(parse, captions) if s.relation is not None]
    if not specs:
        raise ValueError("relation_chance needs position captions (e.g. 'a red circle left of a blue square')")
    held = 0
    for k in range(samples):
        spec = specs[k % len(specs)]
        a, b = layout(replace(spec, relation=None), rng)  # no relation: the layout puts both in random cells
        held += holds(a, spec.relation, b)
    return held / samples


def render(caption: str, seed: int, size: int = SIZE) -> np.ndarray:
    """A ground-truth image of ``caption`` (any caption, held-out compositions included)."""
    return draw(layout(parse(caption), np.random.default_rng(seed), size), size)


def training_batch(
    n: int, rng: np.random.Generator, size: int = SIZE, weights: tuple[float, ...] | None = None
) -> tuple[np.ndarray, list[str]]:
    """``n`` training scenes [n, size, size, 3] in [0, 1] and their captions (no held-out composition drawn)."""
    specs = [random_spec(rng, weights) for _ in range(n)]
    imgs = [draw(layout(s, rng, size, allow_held_out=False), size) for s in specs]
    return np.stack(imgs), [s.caption for s in specs]
