"""Deterministic synthetic minimal-pair dataset: one coloured shape on a cluttered background.

A *scene* fixes everything about an image (background, clutter, object position and size, shape,
colour). Re-rendering a scene with another colour changes exactly the object's pixels; with another
shape, only pixels inside the union of the two shape masks. That makes every SIP pair a true minimal
pair with a known object region, which the real datasets cannot offer.
"""

from __future__ import annotations

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


def make_question(task: str, first: str, second: str, subject: str = SUBJECT) -> str:
    """The task's question with the two options in the given order."""
    return QUESTION_TEMPLATES[task].format(subject=subject, a=first, b=second)
