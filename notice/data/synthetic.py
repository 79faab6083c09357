"""Deterministic synthetic minimal-pair dataset: one coloured shape on a cluttered background.

A *scene* fixes everything about an image (background, clutter, object position and size, shape,
colour). Re-rendering a scene with another colour changes exactly the object's pixels; with another
shape, only pixels inside the union of the two shape masks. That makes every SIP pair a true minimal
pair with a known object region, which the real datasets cannot offer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from notice.files.tables import IMAGE_POOL_COLUMNS, SAMPLE_COLUMNS, write_table

# Attribute values per task. All are single lowercase GloVe words (distractor filtering uses word
# vectors) and single tokens in the toy models' tokenizers.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 50, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
TASK_VALUES: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES}
TASKS: tuple[str, ...] = tuple(TASK_VALUES)

# Attribute group of every value (the samples table's `group`): the attribute family, as MIT-States
# groups its states into colour / shape / texture, so "same group" distractors are the task's values.
VALUE_GROUPS: dict[str, str] = {value: task for task, values in TASK_VALUES.items() for value in values}

SUBJECT = "object"

# One question template per task, reused by every later stage (prompts, STR, SIP).
QUESTION_TEMPLATES: dict[str, str] = {
    "colour": "is the {subject} {a} or {b}?",
    "shape": "is the {subject} a {a} or a {b}?",
}

# Independent random streams per use, so training images never repeat the dataset's scenes.
STREAMS: dict[str, int] = {"dataset": 0, "train": 1, "eval": 2}

# Image side in pixels unless asked otherwise (the schema's default of a dataset's image_size).
IMAGE_SIZE = 64

# Geometry, as fractions of the image size.
RADIUS_RANGE = (0.12, 0.2)
CLUTTER_MARGIN_PX = 2  # clutter keeps this distance from every possible object shape


def task_value_problems(task_values: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
    """(key path under `tasks`, what is wrong) for every task of `task_values` (task -> the values to ask)
    that the generator cannot make: an unknown task or value, fewer than two different values (a distractor
    is another value of the task). Empty when it can."""
    if not task_values:
        return [("tasks", f"no task; the synthetic generator asks {list(TASK_VALUES)}, one or both")]
    problems = []
    for task, values in task_values.items():
        if task not in TASK_VALUES:
            problems.append(
                (f"tasks.{task}", f"the synthetic generator has no task {task!r}; it asks {list(TASK_VALUES)}")
            )
            continue
        unknown = [value for value in values if value not in TASK_VALUES[task]]
        if unknown:
            problems.append(
                (
                    f"tasks.{task}.values",
                    f"{unknown} not known to the synthetic generator, which renders {list(TASK_VALUES[task])} "
                    "(any two or more of them)",
                )
            )
        elif len(set(values)) < 2:
            problems.append(
                (
                    f"tasks.{task}.values",
                    f"{list(values)} has fewer than two different values (the distractor is another value of the task)",
                )
            )
    return problems


def asked_values(task_values: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    """The tasks and values of `task_values` in the generator's order (None: every task and value); a
    ValueError names whatever the generator cannot make (`task_value_problems`)."""
    if task_values is None:
        return dict(TASK_VALUES)
    problems = task_value_problems(task_values)
    if problems:
        raise ValueError("; ".join(f"{where}: {what}" for where, what in problems))
    return {
        task: tuple(value for value in values if value in task_values[task])
        for task, values in TASK_VALUES.items()
        if task in task_values
    }


def make_question(task: str, first: str, second: str, subject: str = SUBJECT) -> str:
    """The task's question with the two options in the given order."""
    return QUESTION_TEMPLATES[task].format(subject=subject, a=first, b=second)


def stream_rng(seed: int, stream: str, index: int | None = None) -> np.random.Generator:
    """RNG of one named stream (and optionally one item of it) derived from `seed`."""
    key = [seed, STREAMS[stream]] + ([] if index is None else [index])
    return np.random.default_rng(key)


@dataclass(frozen=True)
class Clutter:
    """A distractor mark: a grey dot (two points: bounding box) or a thin line (two end points)."""

    kind: str  # "dot" or "line"
    points: tuple[float, float, float, float]
    grey: int


@dataclass(frozen=True)
class Scene:
    scene_id: str
    image_size: int
    shape: str
    colour: str
    center: tuple[float, float]  # (x, y) in pixels
    radius: float
    background: tuple[tuple[int, int, int], tuple[int, int, int]]  # top and bottom colour of a gradient
    clutter: tuple[Clutter, ...]


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y of pixel centres."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return xs, ys


def shape_mask(shape: str, center: tuple[float, float], radius: float, size: int) -> np.ndarray:
    """Boolean mask of a shape of roughly equal area for every shape, centred at `center`."""
    xs, ys = _pixel_grid(size)
    dx, dy = xs - center[0], ys - center[1]
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        half = 0.85 * radius
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        # Apex up; base at 0.75 r below the centre; sides through (±1.1 r, base).
        base, half_width = 0.75 * radius, 1.1 * radius
        height = base + radius
        return (dy <= base) & (np.abs(dx) * height <= half_width * (dy + radius))
    if shape == "cross":
        arm = 0.38 * radius
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(px):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def sample_scene(
    rng: np.random.Generator,
    scene_id: str,
    image_size: int = IMAGE_SIZE,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
) -> Scene:
    """Draw every property of a scene from `rng` (vectorised draws: this runs for every training image);
    the shape among `shapes`, the colour among `colours` (default: all, the only draws of the training)."""
    s = image_size
    radius = float(rng.uniform(*RADIUS_RANGE) * s)
    cx, cy = rng.uniform(radius + 1, s - radius - 1, 2).tolist()
    # Near-neutral backgrounds (slight tint), never close to the saturated object colours.
    background = np.clip(rng.integers(80, 190, (2, 1)) + rng.integers(-12, 13, (2, 3)), 0, 255)
    n_dots, n_lines = int(rng.integers(3, 9)), int(rng.integers(1, 4))
    n = n_dots + n_lines
    # Clutter greys contrast with the background, darker or lighter.
    greys = np.clip(background.mean() + rng.choice([-1, 1], n) * rng.integers(45, 80, n), 0, 255).astype(int)
    xy = rng.uniform(0, s, (n, 2))
    dot_r = rng.uniform(0.8, 1.8, n)
    angle, length = rng.uniform(0, np.pi, n), rng.uniform(0.15, 0.4, n) * s
    dots = np.column_stack([xy - dot_r[:, None], xy + dot_r[:, None]])
    lines = np.column_stack([xy, xy + np.column_stack([np.cos(angle), np.sin(angle)]) * length[:, None]])
    clutter = tuple(
        Clutter("dot" if i < n_dots else "line", tuple((dots if i < n_dots else lines)[i].tolist()), int(greys[i]))
        for i in range(n)
    )
    top, bottom = (cast(tuple[int, int, int], tuple(row)) for row in background.tolist())
    return Scene(
        scene_id=scene_id,
        image_size=s,
        shape=shapes[int(rng.integers(len(shapes)))],
        colour=colours[int(rng.integers(len(colours)))],
        center=(cx, cy),
        radius=radius,
        background=(top, bottom),
        clutter=clutter,
    )


def _render_background(scene: Scene) -> np.ndarray:
    """Background gradient plus clutter, identical for every shape and colour of the scene."""
    s = scene.image_size
    top, bottom = (np.array(c, dtype=np.float64) for c in scene.background)
    t = (np.arange(s, dtype=np.float64) / max(s - 1, 1))[:, None, None]
    img = np.broadcast_to(np.rint(top + t * (bottom - top)), (s, s, 3)).astype(np.uint8).copy()
    layer = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(layer)
    for i, c in enumerate(scene.clutter, start=1):
        if c.kind == "dot":
            draw.ellipse(c.points, fill=i)
        else:
            draw.line(c.points, fill=i, width=1)
    ids = np.asarray(layer)
    # No clutter where any shape of this position and size could be (shape changes stay minimal).
    keep_out = np.zeros((s, s), dtype=bool)
    for shape in SHAPES:
        keep_out |= shape_mask(shape, scene.center, scene.radius, s)
    keep_out = _dilate(keep_out, CLUTTER_MARGIN_PX)
    greys = np.array([0] + [c.grey for c in scene.clutter], dtype=np.uint8)
    marked = (ids > 0) & ~keep_out
    img[marked] = greys[ids[marked]][:, None]
    return img


def render_array(scene: Scene, **overrides) -> tuple[np.ndarray, np.ndarray]:
    """Render `scene` (with fields replaced by `overrides`) as an RGB uint8 array and its object mask."""
    if overrides:
        scene = dataclasses.replace(scene, **overrides)
    img = _render_background(scene)
    mask = shape_mask(scene.shape, scene.center, scene.radius, scene.image_size)
    img[mask] = COLOURS[scene.colour]
    return img, mask


def render_scene(scene: Scene, **overrides) -> tuple[Image.Image, np.ndarray]:
    """Render `scene` (e.g. `render_scene(scene, colour="blue")`) as a PIL image and its bool mask."""
    img, mask = render_array(scene, **overrides)
    return Image.fromarray(img, mode="RGB"), mask


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")


def generate_dataset(
    out_dir: str | Path,
    n_scenes: int,
    seed: int,
    image_size: int = IMAGE_SIZE,
    dataset: str = "synthetic",
    task_values: Mapping[str, Sequence[str]] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write images, masks, `samples.parquet` and `image_pool.parquet` under `out_dir`.

    Layout: `images/<scene>.png` (clean), `masks/<scene>.png` (0/255), `variants/<scene>_<task>_<value>.png`
    (the scene re-rendered with another value; shape variants with `..._mask.png`). Paths in the tables
    are `str(out_dir / ...)`. Scene i depends only on (seed, i), so files are byte-identical on rerun.

    `task_values` (task -> values, see `asked_values`; None: every task and value) picks the tasks asked
    and the values each scene's attribute is drawn from and re-rendered with, so that every answer and
    every pool image is one of its task's values. An attribute no task asks about keeps all its values;
    with all of a task's values the scenes are the full dataset's.
    """
    asked = asked_values(task_values)
    shapes, colours = asked.get("shape", SHAPES), asked.get("colour", tuple(COLOURS))
    out = Path(out_dir)
    for sub in ("images", "masks", "variants"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    samples, pool = [], []
    for i in range(n_scenes):
        scene_id = f"scene{i:05d}"
        scene = sample_scene(stream_rng(seed, "dataset", i), scene_id, image_size, shapes, colours)
        img, mask = render_array(scene)
        image_path, mask_path = out / "images" / f"{scene_id}.png", out / "masks" / f"{scene_id}.png"
        _save_png(img, image_path)
        _save_png(mask.astype(np.uint8) * 255, mask_path)
        own = {"colour": scene.colour, "shape": scene.shape}
        for task, values in asked.items():
            pool_key = f"{scene_id}_{task}"
            samples.append(
                dict(
                    sample_id=f"{dataset}_{pool_key}",
                    dataset=dataset,
                    task=task,
                    image_id=scene_id,
                    image_path=str(image_path),
                    mask_path=str(mask_path),
                    subject=SUBJECT,
                    answer=own[task],
                    category=own[task],
                    group=VALUE_GROUPS[own[task]],
                    pool_key=pool_key,
                )
            )
            for value in values:
                v_image, v_mask = image_path, mask_path
                if value != own[task]:
                    v_img, v_m = render_array(scene, **{task: value})
                    v_image = out / "variants" / f"{pool_key}_{value}.png"
                    _save_png(v_img, v_image)
                    if task == "shape":  # a colour variant keeps the scene's mask
                        v_mask = out / "variants" / f"{pool_key}_{value}_mask.png"
                        _save_png(v_m.astype(np.uint8) * 255, v_mask)
                pool.append(
                    dict(
                        dataset=dataset,
                        task=task,
                        pool_key=pool_key,
                        value=value,
                        image_path=str(v_image),
                        mask_path=str(v_mask),
                    )
                )
    samples_df = pd.DataFrame(samples, columns=list(SAMPLE_COLUMNS))
    pool_df = pd.DataFrame(pool, columns=list(IMAGE_POOL_COLUMNS))
    write_table(samples_df, out / "samples.parquet", SAMPLE_COLUMNS)
    write_table(pool_df, out / "image_pool.parquet", IMAGE_POOL_COLUMNS)
    return samples_df, pool_df


@dataclass(frozen=True)
class Question:
    task: str
    answer: str
    distractor: str
    correct_first: bool
    text: str


def draw_question(
    rng: np.random.Generator, scene: Scene, shape_fraction: float = 0.5, task: str | None = None
) -> Question:
    """A question about `scene`: about `task`, or if None shape with probability `shape_fraction`,
    else colour; a random distractor of the same task; the correct option first or second with equal
    probability."""
    if task is None:
        task = "shape" if rng.random() < shape_fraction else "colour"
    answer = scene.shape if task == "shape" else scene.colour
    others = [v for v in TASK_VALUES[task] if v != answer]
    distractor = others[int(rng.integers(len(others)))]
    correct_first = bool(rng.random() < 0.5)
    first, second = (answer, distractor) if correct_first else (distractor, answer)
    return Question(task, answer, distractor, correct_first, make_question(task, first, second))


@dataclass(frozen=True)
class TrainingExample:
    scene: Scene
    image: np.ndarray  # RGB uint8 [H, W, 3]; the mask is `render_array(scene)[1]`
    question: Question


def sample_training_batch(
    rng: np.random.Generator, batch_size: int, image_size: int = IMAGE_SIZE, shape_fraction: float = 0.5
) -> list[TrainingExample]:
    """Fresh scenes with one question each (see `draw_question`).

    Use `stream_rng(seed, "train")` / `stream_rng(seed, "eval")`: those streams never produce the
    dataset's scenes (stream "dataset").
    """
    batch = []
    for _ in range(batch_size):
        scene = sample_scene(rng, "train", image_size)
        batch.append(TrainingExample(scene, render_array(scene)[0], draw_question(rng, scene, shape_fraction)))
    return batch
