"""Hand-built results and accuracy tables with planted effects, so every expected set is known by hand.

Shared by the head-statistics, figure and report tests.
"""

import pandas as pd

from notice.files.tables import RESULT_COLUMNS
from notice.method.heads import module_effects
from notice.method.screen import VALIDATION_COLUMNS
from notice.present.report import ScreenResults

LAYERS, HEADS, N_SAMPLES = 3, 6, 20
# 18 heads per condition: the 2-sigma rule lets at most 3 equal planted heads through
# (three 10s among zeros: threshold = 1.667 + 2·3.727 = 9.12).
MULTIMODAL, VISION, TEXT, PARTIAL = (2, 0), (1, 2), (0, 3), (2, 1)
PLANTED = {
    ("A", "image"): [MULTIMODAL, VISION, PARTIAL],  # PARTIAL: significant in one task only
    ("B", "image"): [MULTIMODAL, VISION],
    ("A", "text"): [MULTIMODAL, TEXT],
    ("B", "text"): [MULTIMODAL, TEXT],
}
CORRUPTION = {"image": "sip", "text": "str"}


def row(**values) -> dict:
    base = dict.fromkeys(RESULT_COLUMNS, 0.0)
    base.update(model="toy", dataset="synthetic", head=-1, token="x", ld_clean=2.0, ld_corrupt=-1.0)
    base.update(values)
    return base


def head_rows(task: str, corruption: str, modality: str, planted: list, n_samples: int = N_SAMPLES) -> list[dict]:
    rows = []
    for i in range(n_samples):
        for layer in range(LAYERS):
            for head in range(HEADS):
                # ±0.2 noise whose sign depends on the head, so resampling moves heads differently;
                # it averages to exactly 0 over the 20 samples
                effect = (10.0 if (layer, head) in planted else 0.0) + 0.2 * (-1) ** (i + head)
                rows.append(
                    row(
                        task=task,
                        corruption=corruption,
                        modality=modality,
                        sample_id=f"{task}{i:02d}",
                        site="cross_attn_head",
                        layer=layer,
                        head=head,
                        position=3 + i % 2,
                        token="red" if i % 2 else "blue",
                        logit_diff=effect,
                        prob_restoration=effect / 20,
                    )
                )
    return rows


def planted_results() -> pd.DataFrame:
    rows = []
    for (task, modality), planted in PLANTED.items():
        rows += head_rows(task, CORRUPTION[modality], modality, planted)
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def borderline_results(n: int = 5) -> pd.DataFrame:
    """One head with effect 30 in the first sample only, every other effect 0.

    Alone among 18 zero-mean heads, the head is significant iff its first sample is drawn at
    least once (threshold = 0.514 · its mean), so P(significant) = 1 − (1 − 1/n)^n.
    """
    rows = []
    for modality, task in [("image", "A"), ("text", "A")]:
        for i in range(n):
            for layer in range(LAYERS):
                for head in range(HEADS):
                    effect = 30.0 if (layer, head) == (1, 1) and i == 0 else 0.0
                    rows.append(
                        row(
                            task=task,
                            corruption=CORRUPTION[modality],
                            modality=modality,
                            sample_id=f"s{i}",
                            site="cross_attn_head",
                            layer=layer,
                            head=head,
                            position=4,
                            logit_diff=effect,
                        )
                    )
    return pd.DataFrame(rows)


def module_rows() -> pd.DataFrame:
    rows = []
    for i, (first, second) in enumerate([("red", "blue"), ("blue", "red"), ("red", "blue")]):
        tokens = ["[CLS]", "is", first, "or", second]
        for site in ("mlp", "self_attn"):
            for layer in range(2):
                for position, token in enumerate(tokens):
                    rows.append(
                        row(
                            task="A",
                            corruption="sip",
                            modality="image",
                            sample_id=f"s{i}",
                            site=site,
                            layer=layer,
                            position=position,
                            token=token,
                            prob_restoration=float(i + layer + position),
                        )
                    )
    rows.append(
        row(
            task="A",
            corruption="sip",
            modality="image",
            sample_id="s0",
            site="cross_attn_head",
            layer=0,
            head=1,
            position=2,
            token="red",
            prob_restoration=99.0,
        )
    )
    return pd.DataFrame(rows)


def accuracy_table() -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "task": ["A", "A", "A", "B", "B"],
            "category": ["red", "blue", "all", "happy", "all"],
            "n": [10, 10, 20, 5, 5],
            "n_correct": [9, 8, 17, 5, 5],
        }
    )
    return df.assign(accuracy=df["n_correct"] / df["n"])


def module_table() -> pd.DataFrame:
    sip = module_rows()
    noise = sip.assign(corruption="gaussian_noise", prob_restoration=-sip["prob_restoration"] / 10)
    return module_effects(pd.concat([sip, noise]), metric="prob_restoration")


def empty_screen(precision: pd.DataFrame | None = None) -> ScreenResults:
    """The screen's outputs of a run whose screen has no rows (with `precision`: its precision audits)."""
    return ScreenResults(
        pd.DataFrame(columns=list(VALIDATION_COLUMNS)),
        pd.DataFrame(columns=["model", "dataset", "corruption", "exact", "estimate"]),
        pd.DataFrame(columns=["model", "dataset", "corruption", "task", "effect_on_object", "object_area", "ratio"]),
        {},
        precision,
    )
