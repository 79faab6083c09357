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


# -- the flow stage's tables (notice.flow: knockout, logit lens, ablation; labels in front) ------------------
FLOW_LABELS = ("model", "dataset", "task", "sample_id")
KNOCKOUT_TABLE_COLUMNS = (
    *FLOW_LABELS,
    *("source", "target", "layer_start", "window", "p_base", "p_knock", "ld_base", "ld_knock", "relative_change"),
)
LOGIT_LENS_TABLE_COLUMNS = (
    *FLOW_LABELS,
    *("layer", "position", "row", "col", "top_tokens", "answer_rank", "answer_in_top5", "object_in_top5"),
)
ABLATION_TABLE_COLUMNS = (
    *FLOW_LABELS,
    *("ablated", "draw", "n_tokens", "ld_base", "ld_ablated", "ld_change", "correct_base", "correct_ablated"),
)
SKIPPED_TABLE_COLUMNS = (*FLOW_LABELS, "analysis", "item", "reason")
FLOW_LAYERS, FLOW_WINDOW = 8, 2
# image -> last carries the answer in layer 4 for colour (windows starting at 3 and 4 contain it) and in layer 6
# for shape; the dip is deepest where the planted window starts: colour 3, shape 5.
KNOCKOUT_DIPS = {"colour": {3: -0.8, 4: -0.5}, "shape": {5: -0.9, 6: -0.3}}
FLOW_EDGES = (("image", "last"), ("question", "last"))


def planted_knockout(n_samples: int = 6) -> pd.DataFrame:
    """Every sample of each task: the planted dip on image:last, ±0.02 noise that averages to 0 elsewhere."""
    rows = []
    for task, dips in KNOCKOUT_DIPS.items():
        for i in range(n_samples):
            for source, target in FLOW_EDGES:
                for start in range(FLOW_LAYERS - FLOW_WINDOW + 1):
                    planted = dips.get(start, 0.0) if (source, target) == ("image", "last") else 0.0
                    change = planted + 0.02 * (-1) ** i
                    rows.append(
                        dict(
                            model="toy",
                            dataset="synthetic",
                            task=task,
                            sample_id=f"{task}{i}",
                            source=source,
                            target=target,
                            layer_start=start,
                            window=FLOW_WINDOW,
                            p_base=0.5,
                            p_knock=0.5 * (1 + change),
                            ld_base=1.0,
                            ld_knock=1.0 + change,
                            relative_change=change,
                        )
                    )
    return pd.DataFrame(rows, columns=list(KNOCKOUT_TABLE_COLUMNS))


LENS_LAYERS, LENS_GRID = 4, (3, 3)
# The answer enters the top 5 of the object's patches (rows 0-1, cols 0-1) at layer 2 and of every patch at layer 3.
LENS_OBJECT = {(0, 0), (0, 1), (1, 0), (1, 1)}


def planted_lens(n_samples: int = 3) -> pd.DataFrame:
    """Colour knows its object word (in the top 5 exactly where the answer is at layer 3); shape does not."""
    rows = []
    for task in ("colour", "shape"):
        for i in range(n_samples):
            for layer in range(LENS_LAYERS):
                for position, (r, c) in enumerate((r, c) for r in range(LENS_GRID[0]) for c in range(LENS_GRID[1])):
                    in_top5 = layer == 3 or (layer == 2 and (r, c) in LENS_OBJECT)
                    rows.append(
                        dict(
                            model="toy",
                            dataset="synthetic",
                            task=task,
                            sample_id=f"{task}{i}",
                            layer=layer,
                            position=10 + position,
                            row=r,
                            col=c,
                            top_tokens="red|a|the|of|is" if in_top5 else "a|the|of|is|it",
                            answer_rank=1 if in_top5 else 50 * (LENS_LAYERS - layer),
                            answer_in_top5=in_top5,
                            object_in_top5=(layer == 3 and (r, c) in LENS_OBJECT) if task == "colour" else None,
                        )
                    )
    return pd.DataFrame(rows, columns=list(LOGIT_LENS_TABLE_COLUMNS))


# Ablating the object's tokens costs 2.0 of logit difference (colour) / 1.0 (shape); random ones 0.1 / 0.3 on average.
ABLATION_EFFECTS = {"colour": (-2.0, [-0.05, -0.15]), "shape": (-1.0, [-0.2, -0.4])}


def planted_ablation(n_samples: int = 4) -> pd.DataFrame:
    rows = []
    for task, (on_object, random_draws) in ABLATION_EFFECTS.items():
        for i in range(n_samples):
            common = dict(model="toy", dataset="synthetic", task=task, sample_id=f"{task}{i}", n_tokens=4, ld_base=3.0)
            # one sample in four (i == 0) loses its right answer when the object is ablated
            rows.append(
                {**common, "ablated": "object", "draw": 0, "ld_ablated": 3.0 + on_object, "ld_change": on_object}
                | {"correct_base": True, "correct_ablated": i != 0}
            )
            for draw, change in enumerate(random_draws):
                rows.append(
                    {**common, "ablated": "random", "draw": draw, "ld_ablated": 3.0 + change, "ld_change": change}
                    | {"correct_base": True, "correct_ablated": True}
                )
    return pd.DataFrame(rows, columns=list(ABLATION_TABLE_COLUMNS))


def planted_skipped() -> pd.DataFrame:
    labels = dict(model="toy", dataset="synthetic", task="shape")
    rows = [
        {**labels, "sample_id": f"shape{i}", "analysis": "knockout", "item": edge, "reason": "no object mask"}
        for i in range(2)
        for edge in ("object:question", "object:last")
    ]
    rows.append({**labels, "sample_id": "shape0", "analysis": "ablation", "item": "object", "reason": "no object mask"})
    return pd.DataFrame(rows, columns=list(SKIPPED_TABLE_COLUMNS))
