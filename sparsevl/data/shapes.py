"""The built-in shapes benchmark: coloured shapes on a grid, captions, and question-answer pairs.

Scenes are sampled with numpy, rendered with PIL, and written as PNG files plus LLaVA-style JSON.
Every answer is computed by `answer_query` from a structured query, so tests and evaluators can
recompute it from `scenes.json`.
"""

import json
import os
from collections import Counter
from dataclasses import dataclass
from itertools import chain, cycle
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

COLOURS = {
    "red": (230, 25, 25),
    "green": (25, 200, 25),
    "blue": (40, 90, 255),
    "yellow": (250, 230, 20),
    "purple": (160, 40, 220),
    "orange": (255, 140, 0),
}
SHAPES = ("circle", "square", "triangle", "cross")
PAIRS = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)  # canonical order
QUESTION_TYPES = ("colour", "shape", "count", "position", "exists")
EVAL_TYPES = ("colour", "shape", "count", "position")  # test_qa.json; exists lives in test_pope.json
SMALL_TYPE = "small"  # with --small_objects: "What colour is the small circle?" (train and test_qa)
MIN_SMALL_CELL_PX = 16  # a small object fills a quarter of its cell
POPE_KINDS = ("random", "popular", "adversarial")
NEGATIVE_TOP_K = 3  # popular/adversarial negatives are drawn from the top-k ranked candidates
MIN_CELL_PX = 8
CAPTION_PROMPT = "Describe the image."
IMAGE_TOKEN = "<image>"
RNG_STREAMS = ("train_scenes", "test_scenes", "train_questions", "test_questions")
# Finetune exists questions cycle through this plan: balanced yes/no, every negative kind equally.
EXISTS_PLAN = tuple((answer, kind) for kind in POPE_KINDS for answer in ("yes", "no"))


@dataclass(frozen=True)
class SceneObject:
    """One shape filling the grid cell at (row, col), or its top-left quarter when `size` is "small"."""

    colour: str
    shape: str
    row: int
    col: int
    size: str = "large"

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    def to_dict(self) -> dict:
        small = {"size": self.size} if self.size != "large" else {}
        return {"colour": self.colour, "shape": self.shape, "row": self.row, "col": self.col, **small}

    @classmethod
    def from_dict(cls, data: dict) -> "SceneObject":
        return cls(**data)


@dataclass(frozen=True)
class Scene:
    """A grid×grid board; objects are kept in row-major order."""

    objects: tuple[SceneObject, ...]
    grid: int

    def to_dict(self) -> dict:
        return {"grid": self.grid, "objects": [obj.to_dict() for obj in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        return cls(tuple(SceneObject.from_dict(obj) for obj in data["objects"]), data["grid"])


def quadrant(obj: SceneObject, grid: int) -> str:
    """The board quadrant holding the object's cell, e.g. "top left"."""
    vertical = "top" if obj.row < grid // 2 else "bottom"
    horizontal = "left" if obj.col < grid // 2 else "right"
    return f"{vertical} {horizontal}"


def sample_scene(rng: np.random.Generator, grid: int, min_objects: int, max_objects: int,
                 small_percent: int = 0) -> Scene:
    """Distinct cells and distinct (colour, shape) pairs, uniform object count; each object small with
    probability `small_percent`% (drawn only when > 0, so other datasets keep their random streams)."""
    num_objects = int(rng.integers(min_objects, max_objects + 1))
    cells = sorted(rng.choice(grid * grid, size=num_objects, replace=False).tolist())
    pair_ids = rng.choice(len(PAIRS), size=num_objects, replace=False).tolist()
    small = (rng.random(num_objects) < small_percent / 100).tolist() if small_percent else [False] * num_objects
    objects = [SceneObject(*PAIRS[p], *divmod(cell, grid), "small" if tiny else "large")
               for cell, p, tiny in zip(cells, pair_ids, small)]
    return Scene(tuple(objects), grid)


# ---------------------------------------------------------------- rendering


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, cell_px: int) -> None:
    """Draw one shape inside its cell (small: the cell's top-left quarter), inset by a fixed margin."""
    side = cell_px // 2 if obj.size == "small" else cell_px
    margin = max(1, side // 8)
    x0, y0 = obj.col * cell_px + margin, obj.row * cell_px + margin
    x1, y1 = x0 + side - 2 * margin - 1, y0 + side - 2 * margin - 1  # inclusive corners
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape == "cross":
        side = x1 - x0 + 1
        bar = max(1, side // 3)
        offset = (side - bar) // 2
        draw.rectangle([x0, y0 + offset, x1, y0 + offset + bar - 1], fill=fill)
        draw.rectangle([x0 + offset, y0, x0 + offset + bar - 1, y1], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; choose from {SHAPES}")


def render(scene: Scene, image_size: int) -> Image.Image:
    """The scene as an RGB image on a black background."""
    image = Image.new("RGB", (image_size, image_size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, image_size // scene.grid)
    return image


# ---------------------------------------------------------------- questions and answers


def question_text(query: dict) -> str:
    """The one fixed phrasing of a query."""
    templates = {
        "colour": "What colour is the {shape}?",
        "shape": "What shape is the {colour} object?",
        "count": "How many objects are there?",
        "position": "Where is the {colour} {shape}?",
        "exists": "Is there a {colour} {shape} in the image?",
        SMALL_TYPE: "What colour is the small {shape}?",
    }
    if query["type"] not in templates:
        raise ValueError(f"query type {query['type']!r} is not one of {QUESTION_TYPES}")
    return templates[query["type"]].format(**query)


def _only(objects: list[SceneObject], query: dict) -> SceneObject:
    if len(objects) != 1:
        raise ValueError(f"query {query} matches {len(objects)} objects; it needs exactly one")
    return objects[0]


def answer_query(scene: Scene, query: dict) -> str:
    """The answer to a structured query, computed from the scene alone."""
    objects, qtype = scene.objects, query["type"]
    if qtype == "colour":
        return _only([o for o in objects if o.shape == query["shape"]], query).colour
    if qtype == "shape":
        return _only([o for o in objects if o.colour == query["colour"]], query).shape
    if qtype == "count":
        return str(len(objects))
    if qtype == SMALL_TYPE:
        return _only([o for o in objects if o.shape == query["shape"] and o.size == "small"], query).colour
    pair = (query["colour"], query["shape"])
    if qtype == "position":
        return quadrant(_only([o for o in objects if o.pair == pair], query), scene.grid)
    if qtype == "exists":
        return "yes" if any(o.pair == pair for o in objects) else "no"
    raise ValueError(f"query type {qtype!r} is not one of {QUESTION_TYPES}")


def caption(scene: Scene) -> str:
    """E.g. "2 objects: red circle top left, blue square bottom right."."""
    noun = "object" if len(scene.objects) == 1 else "objects"
    parts = [f"{'small ' if o.size == 'small' else ''}{o.colour} {o.shape} {quadrant(o, scene.grid)}"
             for o in scene.objects]
    return f"{len(scene.objects)} {noun}: {', '.join(parts)}."


def candidate_queries(scene: Scene, qtype: str) -> list[dict]:
    """Every query of a type whose answer is defined for the scene (exists: only "yes" ones)."""
    shapes = Counter(o.shape for o in scene.objects)
    colours = Counter(o.colour for o in scene.objects)
    if qtype == "colour":
        return [{"type": "colour", "shape": s} for s in SHAPES if shapes[s] == 1]
    if qtype == "shape":
        return [{"type": "shape", "colour": c} for c in COLOURS if colours[c] == 1]
    if qtype == "count":
        return [{"type": "count"}]
    if qtype == SMALL_TYPE:
        small = Counter(o.shape for o in scene.objects if o.size == "small")
        return [{"type": SMALL_TYPE, "shape": s} for s in SHAPES if small[s] == 1]
    if qtype in ("position", "exists"):
        return [{"type": qtype, "colour": o.colour, "shape": o.shape} for o in scene.objects]
    raise ValueError(f"query type {qtype!r} is not one of {QUESTION_TYPES}")


# ---------------------------------------------------------------- POPE negatives


@dataclass(frozen=True)
class PairStats:
    """How often each (colour, shape) pair occurs, and co-occurs, in the train scenes."""

    frequency: Counter
    cooccurrence: Counter  # (pair_a, pair_b) -> scenes holding both

    @classmethod
    def from_scenes(cls, scenes: list[Scene]) -> "PairStats":
        frequency, cooccurrence = Counter(), Counter()
        for scene in scenes:
            pairs = [o.pair for o in scene.objects]
            frequency.update(pairs)
            cooccurrence.update((a, b) for a in pairs for b in pairs if a != b)
        return cls(frequency, cooccurrence)


def negative_candidates(scene: Scene, kind: str, stats: PairStats) -> list[tuple[str, str]]:
    """Absent pairs a POPE negative of this kind may ask about, best first."""
    present = [o.pair for o in scene.objects]
    absent = [p for p in PAIRS if p not in present]
    if kind == "random":
        return absent
    if kind == "popular":
        return sorted(absent, key=lambda p: -stats.frequency[p])[:NEGATIVE_TOP_K]
    if kind == "adversarial":
        sharing = [p for p in absent if any(p[0] == q[0] or p[1] == q[1] for q in present)]
        score = {p: sum(stats.cooccurrence[(q, p)] for q in present) for p in sharing}
        return sorted(sharing, key=lambda p: -score[p])[:NEGATIVE_TOP_K]
    raise ValueError(f"negative kind {kind!r} is not one of {POPE_KINDS}")


def exists_query(scene: Scene, answer: str, kind: str, stats: PairStats, rng, asked=()) -> dict | None:
    """A yes (present pair) or no (negative of `kind`) exists query not in `asked`, or None."""
    if answer == "yes":
        queries = candidate_queries(scene, "exists")
    else:
        pairs = negative_candidates(scene, kind, stats)
        queries = [{"type": "exists", "colour": c, "shape": s} for c, s in pairs]
    queries = [q for q in queries if q not in asked]
    return queries[int(rng.integers(len(queries)))] if queries else None


# ---------------------------------------------------------------- records


def conversation(turns: list[tuple[str, str]]) -> list[dict]:
    """LLaVA turns from (question, answer) pairs; `<image>` opens the first human turn only."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        prefix = f"{IMAGE_TOKEN}\n" if i == 0 else ""
        messages += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    return messages


def finetune_queries(scene: Scene, num_questions: int, stats: PairStats, rng, exists_plan: Iterator,
                     types: tuple[str, ...] = QUESTION_TYPES) -> list[dict]:
    """Distinct queries mixing all `types`; exists answers and negative kinds follow `exists_plan`."""
    num_rounds = -(-num_questions // len(types))
    wanted = chain.from_iterable(rng.permutation(types).tolist() for _ in range(num_rounds))
    asked: list[dict] = []
    for qtype in list(wanted)[:num_questions]:
        start = types.index(qtype)
        for fallback in types[start:] + types[:start]:
            query = _fresh_query(scene, fallback, stats, rng, asked, exists_plan)
            if query is not None:
                asked.append(query)
                break
        else:
            raise ValueError(f"--qa_per_image={num_questions} exceeds the distinct questions of scene {scene}")
    return asked


def _fresh_query(scene, qtype, stats, rng, asked, exists_plan) -> dict | None:
    if qtype != "exists":
        queries = [q for q in candidate_queries(scene, qtype) if q not in asked]
        return queries[int(rng.integers(len(queries)))] if queries else None
    answer, kind = next(exists_plan)
    return exists_query(scene, answer, kind, stats, rng, asked)


def train_records(path: str, scene: Scene, qa_per_image: int, stats, rng, exists_plan,
                  types: tuple[str, ...] = QUESTION_TYPES) -> tuple[dict, list[dict]]:
    """The caption record and the one-question finetune records of one train image.

    Each question is its own record: in one multi-turn conversation earlier answers give later ones
    away ("Is there a red square?" "yes" ... "What colour is the square?"), and a model trained on such
    turns learns to copy from the text instead of looking at the image.
    """
    record_id = Path(path).stem
    caption_record = {
        "id": f"train_{record_id}_caption",
        "image": path,
        "conversations": conversation([(CAPTION_PROMPT, caption(scene))]),
    }
    queries = finetune_queries(scene, qa_per_image, stats, rng, exists_plan, types)
    finetune = [{"id": f"train_{record_id}_q{i}", "image": path,
                 "conversations": conversation([(question_text(q), answer_query(scene, q))]), "query": q}
                for i, q in enumerate(queries)]
    return caption_record, finetune


def qa_record(record_id: str, path: str, scene: Scene, query: dict, **extra) -> dict:
    """A one-question test record carrying its query and answer."""
    answer = answer_query(scene, query)
    return {
        "id": record_id,
        "image": path,
        "conversations": conversation([(question_text(query), answer)]),
        "question_type": query["type"],
        **extra,
        "query": query,
        "answer": answer,
    }


def eval_qa_record(path: str, scene: Scene, rng, asked_types: Counter, types: tuple[str, ...] = EVAL_TYPES) -> dict:
    """One question per test image, of the least-asked type the scene defines (keeps types even)."""
    queries_by_type = {t: candidate_queries(scene, t) for t in types}
    qtype = min((t for t in types if queries_by_type[t]), key=lambda t: asked_types[t])
    asked_types[qtype] += 1
    query = queries_by_type[qtype][int(rng.integers(len(queries_by_type[qtype])))]
    return qa_record(f"test_{Path(path).stem}_{qtype}", path, scene, query)


def pope_records(path: str, scene: Scene, stats: PairStats, rng) -> list[dict]:
    """Per negative kind, one yes and one no exists question about the image."""
    records = []
    for kind in POPE_KINDS:
        for answer in ("yes", "no"):
            query = exists_query(scene, answer, kind, stats, rng)
            if query is None:
                raise ValueError(f"no {kind} {answer!r} exists question for scene {scene}")
            record_id = f"test_{Path(path).stem}_{kind}_{answer}"
            records.append(qa_record(record_id, path, scene, query, pope_kind=kind))
    return records


# ---------------------------------------------------------------- dataset


def validate_args(*, num_train, num_test, image_size, grid, min_objects, max_objects, qa_per_image, seed,
                  small_objects=0) -> None:
    """Raise ValueError naming the flag whose value cannot make a valid dataset."""
    checks = [
        (num_train >= 1, f"--num_train must be >= 1 (got {num_train}); popular negatives need train scenes"),
        (num_test >= 0, f"--num_test must be >= 0 (got {num_test})"),
        (grid >= 2 and grid % 2 == 0, f"--grid must be even and >= 2 (got {grid}) so every cell has a quadrant"),
        (image_size % grid == 0, f"--image_size={image_size} must be divisible by --grid={grid}"),
        (image_size // grid >= MIN_CELL_PX, f"--image_size/--grid gives {image_size // grid} px cells; need >= {MIN_CELL_PX}"),
        (min_objects >= 1, f"--min_objects must be >= 1 (got {min_objects})"),
        (max_objects >= min_objects, f"--max_objects={max_objects} must be >= --min_objects={min_objects}"),
        (max_objects <= grid * grid, f"--max_objects={max_objects} exceeds the {grid * grid} cells of --grid={grid}"),
        (max_objects <= len(PAIRS), f"--max_objects={max_objects} exceeds the {len(PAIRS)} distinct colour-shape pairs"),
        (qa_per_image >= 1, f"--qa_per_image must be >= 1 (got {qa_per_image})"),
        (seed >= 0, f"--seed must be >= 0 (got {seed})"),
        (0 <= small_objects <= 100, f"--small_objects must be a percentage in 0..100 (got {small_objects})"),
        (not small_objects or image_size // grid >= MIN_SMALL_CELL_PX,
         f"--small_objects needs cells of >= {MIN_SMALL_CELL_PX} px (--image_size/--grid gives {image_size // grid})"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _write_json(path: Path, data: list | dict) -> None:
    """One list item or dict entry per line: readable, greppable, and C-encoder fast."""
    if isinstance(data, dict):
        lines, brackets = [f"{json.dumps(key)}: {json.dumps(value)}" for key, value in data.items()], "{}"
    else:
        lines, brackets = [json.dumps(item) for item in data], "[]"
    path.write_text(brackets[0] + "\n" + ",\n".join(lines) + "\n" + brackets[1] + "\n")


def _rng(seed: int, stream: str) -> np.random.Generator:
    """Independent RNG streams, so that e.g. --num_test never changes the train split."""
    return np.random.default_rng([seed, RNG_STREAMS.index(stream)])


def _sample_split(split: str, count: int, seed: int, grid: int, min_objects: int, max_objects: int,
                  small_objects: int = 0) -> list:
    """(image path, scene) pairs of one split, drawn from the split's own stream."""
    rng = _rng(seed, f"{split}_scenes")
    return [(f"images/{split}/{i:06d}.png", sample_scene(rng, grid, min_objects, max_objects, small_objects))
            for i in range(count)]


def _write_images(out: Path, samples: list, image_size: int) -> None:
    for split in ("train", "test"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    for path, scene in tqdm(samples, desc="rendering", unit="img"):
        render(scene, image_size).save(out / path, format="PNG")


def _counts(samples: dict, captions: list, finetune: list, test_qa: list, test_pope: list) -> dict:
    questions = [record["query"] for record in finetune]
    return {
        "train_images": len(samples["train"]),
        "test_images": len(samples["test"]),
        "captions": len(captions),
        "finetune_records": len(finetune),
        "finetune_questions": dict(Counter(q["type"] for q in questions)),
        "test_qa": len(test_qa),
        "test_qa_by_type": dict(Counter(r["question_type"] for r in test_qa)),
        "test_pope": len(test_pope),
    }


def generate_shapes_dataset(
    out_dir: str | os.PathLike,
    *,
    num_train: int = 4000,
    num_test: int = 500,
    image_size: int = 64,
    grid: int = 4,
    min_objects: int = 1,
    max_objects: int = 6,
    qa_per_image: int = 4,
    seed: int = 0,
    small_objects: int = 0,
) -> dict:
    """Write the benchmark (images, captions, finetune, test QA, POPE, scenes, meta) under out_dir.

    `small_objects`: the percentage of objects drawn small (a quarter of their cell), which adds the "small"
    question type ("What colour is the small circle?") to finetune and test_qa; 0 leaves every file unchanged."""
    args = dict(num_train=num_train, num_test=num_test, image_size=image_size, grid=grid,
                min_objects=min_objects, max_objects=max_objects, qa_per_image=qa_per_image, seed=seed)
    if small_objects:
        args["small_objects"] = small_objects
    validate_args(**args)
    out = Path(out_dir)
    samples = {split: _sample_split(split, args[f"num_{split}"], seed, grid, min_objects, max_objects, small_objects)
               for split in ("train", "test")}
    extra = (SMALL_TYPE,) if small_objects else ()
    stats = PairStats.from_scenes([scene for _, scene in samples["train"]])
    _write_images(out, samples["train"] + samples["test"], image_size)

    rng, exists_plan = _rng(seed, "train_questions"), cycle(EXISTS_PLAN)
    train = [train_records(path, scene, qa_per_image, stats, rng, exists_plan, QUESTION_TYPES + extra)
             for path, scene in samples["train"]]
    captions, finetune = [c for c, _ in train], [record for _, records in train for record in records]
    rng = _rng(seed, "test_questions")
    asked_types = Counter()
    test_qa = [eval_qa_record(path, scene, rng, asked_types, EVAL_TYPES + extra) for path, scene in samples["test"]]
    test_pope = [r for path, scene in samples["test"] for r in pope_records(path, scene, stats, rng)]

    outputs = {"captions": captions, "finetune": finetune, "test_qa": test_qa, "test_pope": test_pope}
    for name, records in outputs.items():
        _write_json(out / f"{name}.json", records)
    _write_json(out / "scenes.json", {p: s.to_dict() for p, s in samples["train"] + samples["test"]})
    counts = _counts(samples, **outputs)
    _write_json(out / "meta.json", {"args": args, "counts": counts,
                                    "colours": COLOURS, "shapes": SHAPES})
    return counts
