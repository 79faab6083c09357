"""The flow stage over a model's selected samples (rule `flow`): on each clean prompt, the token groups, attention
knockout of the edges, the logit lens on image tokens and the object-token ablation, with the labels in front;
what a sample cannot give (no object mask, an empty group) is a row of the skipped table."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from notice.adapters.base import ModelInput, VLMAdapter
from notice.files.tables import stable_seed
from notice.flow.ablation import ABLATION_COLUMNS, ablation_rows, object_keys
from notice.flow.groups import TokenGroups, token_groups
from notice.flow.knockout import KNOCKOUT_COLUMNS, default_window, edges_without_rows, knockout_rows
from notice.flow.logit_lens import LOGIT_LENS_COLUMNS, logit_lens
from notice.flow.records import LABEL_COLUMNS, edge_name, labelled, no_object_reason, skipped_table
from notice.patching.experiment import concat_or_empty


@dataclass(frozen=True)
class FlowSettings:
    """The config's `flow` section as the stage uses it (edges parsed by notice.flow.knockout.parse_edges)."""

    edges: tuple[tuple[str, str], ...]
    window: int | None  # None: default_window of the model's layers
    ablation_draws: int
    engine: str
    batch_size: int
    seed: int


@dataclass(frozen=True)
class FlowTables:
    knockout: pd.DataFrame  # LABEL_COLUMNS + KNOCKOUT_COLUMNS
    logit_lens: pd.DataFrame  # LABEL_COLUMNS + LOGIT_LENS_COLUMNS
    ablation: pd.DataFrame  # LABEL_COLUMNS + ABLATION_COLUMNS
    skipped: pd.DataFrame  # SKIPPED_COLUMNS


def knockout_window(adapter: VLMAdapter, window: int | None) -> int:
    """The window of `flow.window` (None: the model's default), refused when the model has fewer layers."""
    if window is None:
        return default_window(adapter.n_layers)
    if window > adapter.n_layers:
        raise ValueError(f"config flow.window = {window} is more than the model's {adapter.n_layers} layers")
    return window


def knockout_edges(
    adapter: VLMAdapter, inp: ModelInput, groups: TokenGroups, edges: Sequence[tuple[str, str]], has_object_mask: bool
) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(the edges that give knockout rows, in the order given; a skip record for each other edge with
    `knockout.edges_without_rows`' reason: an empty group, or a block the model's attention refuses, e.g. a
    cross-attention family's query left no image key). An empty object group says whether a mask was known."""
    reasons = edges_without_rows(adapter, inp, groups, edges)
    skipped = []
    for edge, reason in reasons.items():
        if "object" in edge and not groups.positions["object"]:
            reason = no_object_reason(has_object_mask)
        skipped.append({"analysis": "knockout", "item": edge_name(edge), "reason": reason})
    return [edge for edge in edges if edge not in reasons], skipped


def ablation_problem(n_object: int, n_image: int, has_object_mask: bool) -> str:
    """Why the object-token ablation cannot run on a sample ("" when it can): no object token, or too few
    non-object tokens to draw as many random ones."""
    if not n_object:
        return no_object_reason(has_object_mask)
    if n_object > n_image - n_object:
        return f"the object covers {n_object} of {n_image} image tokens: too few others to draw as many at random"
    return ""


def object_token_id(adapter: VLMAdapter, subject: str) -> int | None:
    """The object word's token for the logit lens: the sample's subject (the noun its question names) when it is
    one word, else None (not known)."""
    words = str(subject).split()
    return adapter.option_token_id(words[0]) if len(words) == 1 else None


def flow_tables(
    adapter: VLMAdapter,
    samples: pd.DataFrame,
    load_image: Callable[[str], Image.Image],
    settings: FlowSettings,
    lens_ids: Collection[str],
    labels: Mapping[str, str],
) -> FlowTables:
    """The flow tables of every sample (PROMPT_COLUMNS rows and `subject`), with `labels` (model, dataset);
    the logit lens only on the samples of `lens_ids`."""
    window = knockout_window(adapter, settings.window)
    knockout, lens, ablation, skipped = [], [], [], []
    for row in tqdm(samples.itertuples(index=False), total=len(samples), desc="flow", mininterval=5):
        sample_labels: dict[str, Any] = {**labels, "task": row.task, "sample_id": str(row.sample_id)}
        inp = adapter.prepare(load_image(row.image_path), row.prompt)
        mask_path = str(row.mask_path or "")
        mask = adapter.mask_view(Image.open(mask_path), inp) if mask_path else None
        groups = token_groups(adapter, inp, row.question, mask)
        tau, tau_p = int(row.answer_token_id), int(row.distractor_token_id)
        edges, edge_skips = knockout_edges(adapter, inp, groups, settings.edges, mask is not None)
        skipped += [{**sample_labels, **skip} for skip in edge_skips]
        if edges:
            rows = knockout_rows(
                adapter, inp, tau, tau_p, groups, edges, window, engine=settings.engine, batch_size=settings.batch_size
            )
            knockout.append(labelled(rows, sample_labels, KNOCKOUT_COLUMNS))
        grid = adapter.image_grid(inp)
        keys = object_keys(grid, mask if mask is not None else np.zeros((0, 0), np.float32))
        reason = ablation_problem(len(keys), len(grid.keys), mask is not None)
        if reason:
            skipped.append({**sample_labels, "analysis": "ablation", "item": "object", "reason": reason})
        else:
            seed = stable_seed(settings.seed, "flow ablation", row.sample_id)
            rows = ablation_rows(adapter, inp, tau, tau_p, keys, settings.ablation_draws, seed)
            ablation.append(labelled(rows, sample_labels, ABLATION_COLUMNS))
        if str(row.sample_id) in lens_ids:
            lens.append(lens_rows(adapter, inp, tau, row.subject, sample_labels, skipped))
    return FlowTables(
        knockout=concat_or_empty(knockout, [*LABEL_COLUMNS, *KNOCKOUT_COLUMNS]),
        logit_lens=concat_or_empty(lens, [*LABEL_COLUMNS, *LOGIT_LENS_COLUMNS]),
        ablation=concat_or_empty(ablation, [*LABEL_COLUMNS, *ABLATION_COLUMNS]),
        skipped=skipped_table(skipped),
    )


def lens_rows(
    adapter: VLMAdapter, inp: ModelInput, tau: int, subject: str, labels: Mapping[str, Any], skipped: list[dict]
) -> pd.DataFrame:
    """One sample's logit-lens table with its labels; what it lacks is added to `skipped`."""
    object_token = object_token_id(adapter, subject)
    try:
        rows = logit_lens(adapter, inp, tau, object_token)
    except NotImplementedError as refusal:  # the adapter's: the image does not enter the residual stream
        skipped.append({**labels, "analysis": "logit_lens", "item": "image", "reason": str(refusal)})
        return pd.DataFrame(columns=[*LABEL_COLUMNS, *LOGIT_LENS_COLUMNS])
    if object_token is None:
        reason = f"no one-word object name (the subject is {subject!r}): object_in_top5 is empty"
        skipped.append({**labels, "analysis": "logit_lens", "item": "object_in_top5", "reason": reason})
    return labelled(rows, labels, LOGIT_LENS_COLUMNS)
