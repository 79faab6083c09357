"""The attribution screen in the workflow: its tables, its check against exact patching, and where in the
image its effects fall (docs/method.md, §9).

A screen table has the results table's key columns plus `estimate`, LD of the clean and corrupt runs
and the `method`. Validation joins it with every exact effect that has the same keys (the patching
table, and the screen's own exact confirmations) and reports, per site kind: Spearman and Pearson
correlation, top-k recall (the share of each sample's exact top 10 among the screen's top k) and the
misses (exact top-10 sites outside the screen's top k). GradDrop's scores are unsigned, so `atp_star`
is compared with |exact|.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from notice.adapters.base import ModelInput, Patch, VLMAdapter
from notice.files.tables import RESULT_COLUMNS, check_columns
from notice.method.attention import object_mask, read_npz, save_record
from notice.method.head_functions import object_fraction
from notice.patching.attribution import (
    IMAGE_LAYER,
    IMAGE_SITE,
    SCREEN_COLUMNS,
    Estimates,
    attribution_estimates,
    method_label,
    screen_sites,
)
from notice.patching.attribution import estimates_table as pair_table
from notice.patching.corruptions import corrupt_image_fn
from notice.patching.engines import Engine
from notice.patching.experiment import concat_or_empty, pair_inputs, pair_labels
from notice.patching.hooks import ImageFn
from notice.patching.query_keys import qk_sites
from notice.patching.sites import head_sites, site_layers

KEY_COLUMNS: tuple[str, ...] = RESULT_COLUMNS[: RESULT_COLUMNS.index("token")]
LABEL_COLUMNS: tuple[str, ...] = KEY_COLUMNS[: KEY_COLUMNS.index("site")]
TABLE_COLUMNS: tuple[str, ...] = (*LABEL_COLUMNS, *SCREEN_COLUMNS, "method")
GROUP_COLUMNS = ["model", "dataset", "corruption", "site"]
VALIDATION_COLUMNS: tuple[str, ...] = (
    *GROUP_COLUMNS,
    "method",
    "dtype",  # the model's: the screen's estimates are first order and computed in it
    "n_sites",
    "n_samples",
    "sites_per_sample",
    "spearman",
    "pearson",
    "top_k",
    "recall_top10",
    "misses",
    "spearman_atp",
    "recall_top10_atp",
)
EXACT_TOP = 10


def is_unsigned(method: str) -> bool:
    """GradDrop's scores are magnitudes (method labels `notice.patching.attribution.method_label`)."""
    return method in ("atp_star", "atp+grad_drop")


# -- the screen stage -----------------------------------------------------------------------------
def image_effects(adapter: VLMAdapter, estimates: Estimates, inp: ModelInput) -> np.ndarray | None:
    """Effect of each image patch per layer (`fusion_layers` for key sites), [layers, rows · cols] on
    `adapter.image_grid`'s grid.

    Where the fusion attention is the stream's own self-attention, the image tokens are stream positions
    and a layer's effect at a patch is the sum of its module sites' estimates there. Where it is
    cross-attention to the image embeddings (the image is not in the stream), it is the sum over heads of
    the layer's key-site estimates of that embedding row, or without key sites the image site's estimate
    (one "layer"). None when the screen lacks those sites.
    """
    keys = list(adapter.image_grid(inp).keys)
    values = estimates.values
    if adapter.head_site == "self_attn_head":
        sites = [s for s in adapter.module_sites if (s, site_layers(adapter, s)[0]) in values]
        if not sites:
            return None
        return np.stack(
            [
                np.sum([values[(s, layer)].numpy() for s in sites if (s, layer) in values], axis=0)[keys]
                for layer in range(adapter.n_layers)
            ]
        )
    key_site = qk_sites(adapter)[1]
    layers = adapter.fusion_layers()
    if (key_site, layers[0]) in values:
        return np.stack([values[(key_site, layer)].numpy().sum(-1)[keys] for layer in layers])
    image = values.get((IMAGE_SITE, IMAGE_LAYER))
    return None if image is None else image.numpy()[keys][None, :]


def confirm_patches(adapter: VLMAdapter, table: pd.DataFrame, n: int) -> list[Patch]:
    """The `n` sites of one pair's screen with the largest |estimate| that can be patched exactly (all but
    the image-embedding rows): module and head sites first, then the fusion attention's query and key sites,
    each by rank (the confirmed table's row order)."""
    qk = qk_sites(adapter)
    patchable = table[table["site"].isin([*adapter.module_sites, *head_sites(adapter), *qk])]
    top = patchable.reindex(patchable["estimate"].abs().sort_values(ascending=False, kind="stable").index).head(n)
    patches = [Patch(str(r.site), int(r.layer), int(r.position), int(r.head)) for r in top.itertuples()]
    return sorted(patches, key=lambda patch: patch.site in qk)


def check_settings(adapter: VLMAdapter, settings: Mapping) -> None:
    """A `screen` setting this model cannot take stops the job here, before any pair, naming the config key."""
    try:
        screen_sites(adapter, settings.get("sites"))
        method_label(str(settings["method"]), settings.get("qk_fix"), settings.get("grad_drop"))
    except ValueError as error:
        raise ValueError(f"config screen: {error}") from None


def pair_estimates(
    adapter: VLMAdapter,
    pair: Any,
    clean_inp: ModelInput,
    corrupt_inp: ModelInput,
    settings: Mapping,
    corrupt_image_fn: ImageFn | None,
) -> Estimates:
    """The screen of one pair (a PAIR_COLUMNS row) with the config's `screen` settings."""
    return attribution_estimates(
        adapter,
        clean_inp,
        corrupt_inp,
        int(pair.answer_token_id),
        int(pair.distractor_token_id),
        settings.get("sites"),  # absent: every site (no default in the schema: it depends on the model)
        method=str(settings["method"]),
        qk_fix=settings.get("qk_fix"),
        grad_drop=settings.get("grad_drop"),
        corrupt_image_fn=corrupt_image_fn,
    )


def screen_pairs(
    adapter: VLMAdapter,
    pairs: pd.DataFrame,
    load_image: Callable[[str], Image.Image],
    *,
    engine: Engine,
    settings: Mapping,
    corruption_settings: Mapping,
    labels: Mapping[str, str],
    masks: Mapping[str, str],
) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """Screen every pair (PAIR_COLUMNS rows): the screen table (TABLE_COLUMNS), the exact results (by `engine`,
    `notice.patching.engines.get_engine`) of the `confirm_top` sites each pair's screen ranks highest
    (RESULT_COLUMNS), and one image-map record per
    pair (`image_effects`, the image as the model sees it and the object mask from `masks`, sample_id →
    mask path), none where the screen has no image effects."""
    method = str(settings["method"])
    confirm_top = int(settings["confirm_top"])
    check_settings(adapter, settings)
    frames, confirmed, records = [], [], []
    for pair in tqdm(pairs.itertuples(index=False), total=len(pairs), desc=f"screen ({method})", mininterval=5):
        clean_inp, corrupt_inp = pair_inputs(adapter, pair, load_image)
        image_fn = corrupt_image_fn(pair.corruption, corruption_settings, int(pair.noise_seed))
        tau, tau_p = int(pair.answer_token_id), int(pair.distractor_token_id)
        estimates = pair_estimates(adapter, pair, clean_inp, corrupt_inp, settings, image_fn)
        labelled = pair_labels(pair, labels)
        table = pair_table(estimates, clean_inp.tokens).assign(**labelled, method=estimates.method)
        frames.append(table[list(TABLE_COLUMNS)])
        if confirm_top > 0:
            patches = confirm_patches(adapter, table, confirm_top)
            rows = engine(adapter, clean_inp, corrupt_inp, patches, tau, tau_p, corrupt_image_fn=image_fn)
            confirmed.append(pd.DataFrame(rows).assign(**labelled)[list(RESULT_COLUMNS)])
        effects = image_effects(adapter, estimates, clean_inp)
        if effects is not None:
            mask = object_mask(adapter, masks.get(str(pair.sample_id), ""), clean_inp)
            grid = adapter.image_grid(clean_inp)
            records.append(
                {
                    "sample_id": str(pair.sample_id),
                    "task": str(pair.task),
                    "method": estimates.method,
                    "effects": effects.astype(np.float32),
                    "grid": np.asarray([grid.rows, grid.cols]),
                    "image": adapter.model_view(clean_inp),
                    "mask": mask,
                }
            )
    return concat_or_empty(frames, TABLE_COLUMNS), concat_or_empty(confirmed, RESULT_COLUMNS), records


def save_maps(records: Sequence[dict], out_dir: str | Path) -> Path:
    """One compressed .npz per record (`screen_pairs`), numbered in pair order, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, record in enumerate(records):
        save_record(record, out_dir / f"pair{index:05d}.npz")
    return out_dir


def load_maps(maps_dir: str | Path) -> list[dict]:
    """The records `save_maps` wrote, in order."""
    return [read_npz(path, ("sample_id", "task", "method")) for path in sorted(Path(maps_dir).glob("pair*.npz"))]


# -- validation against exact patching ------------------------------------------------------------
def paired_effects(screen: pd.DataFrame, exact: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Screen rows that an exact table has too: TABLE_COLUMNS plus `exact` (the exact logit_diff).

    `exact` are result tables (the patching table, the screen's confirmations); a key in several keeps
    the first table's value (all are exact). Pairs that share keys (a sample's Gaussian-noise draws) are
    averaged on both sides, as the patching analysis averages them.
    """
    check_columns(screen, TABLE_COLUMNS, "screen table")
    for table in exact:
        check_columns(table, [*KEY_COLUMNS, "logit_diff"], "exact results table")
    keys = list(KEY_COLUMNS)
    frames = [t.groupby(keys, sort=False, as_index=False)["logit_diff"].mean() for t in exact if len(t)]
    if not frames:
        return screen.head(0).assign(exact=pd.Series(dtype=float))
    effects = pd.concat(frames, ignore_index=True).drop_duplicates(keys, keep="first")
    effects = effects.rename(columns={"logit_diff": "exact"})
    means = {"estimate": "mean", "estimate_atp": "mean", "ld_clean": "mean", "ld_corrupt": "mean"}
    means |= {"token": "first", "method": "first"}
    screen = screen.groupby(keys, sort=False, as_index=False).agg(means)[list(TABLE_COLUMNS)]
    return screen.merge(effects, on=keys, how="inner", validate="one_to_one")


def _ranked(values: pd.Series, k: int) -> set:
    return set(values.abs().sort_values(ascending=False, kind="stable").index[:k])


def _recall(rows: pd.DataFrame, column: str, top_k: int) -> tuple[float, list]:
    """Share of the sample's exact top 10 (|exact|) among the top `top_k` of `column`, and the missed rows."""
    top_exact = _ranked(rows["exact"], EXACT_TOP)
    lost = sorted(top_exact - _ranked(rows[column], top_k))
    return 1 - len(lost) / len(top_exact), lost


def _correlation(estimate: pd.Series, target: pd.Series, method: str = "pearson") -> float:
    """NaN with fewer than three sites or a constant side (undefined there)."""
    enough = len(estimate) > 2 and estimate.nunique() > 1 and target.nunique() > 1
    return float(estimate.corr(target, method=method)) if enough else float("nan")


def validation_tables(paired: pd.DataFrame, top_k: int, dtype: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(VALIDATION_COLUMNS per model × dataset × corruption × site kind, the missed sites); `dtype` is the
    model's (the screen ran in it).

    A missed site is in a sample's exact top 10 (|exact|) but not in the screen's top `top_k` of that
    sample and site kind; its rows keep both values and ranks. Recall and misses count only samples with
    more than `top_k` sites of the kind (with fewer, the screen's top k holds every site); NaN without one.
    The `_atp` columns are the same numbers for the plain AtP estimate of the same run (`estimate_atp`),
    so that AtP* and AtP are compared on the same sites.
    """
    rows, misses = [], []
    for (model, dataset, corruption, site), group in paired.groupby(GROUP_COLUMNS, sort=True):
        method = str(group["method"].iloc[0])
        target = group["exact"].abs() if is_unsigned(method) else group["exact"]
        recalls, recalls_atp, missed, counts = [], [], 0, []
        for _sample, rows_of in group.groupby(["sample_id", "task", "modality"], sort=True):
            counts.append(len(rows_of))
            if len(rows_of) <= top_k:
                continue
            recall, lost = _recall(rows_of, "estimate", top_k)
            recalls.append(recall)
            recalls_atp.append(_recall(rows_of, "estimate_atp", top_k)[0])
            missed += len(lost)
            if lost:
                exact_rank = rows_of["exact"].abs().rank(ascending=False, method="first")
                screen_rank = rows_of["estimate"].abs().rank(ascending=False, method="first")
                misses.append(rows_of.loc[lost].assign(exact_rank=exact_rank[lost], screen_rank=screen_rank[lost]))
        rows.append(
            {
                "model": model,
                "dataset": dataset,
                "corruption": corruption,
                "site": site,
                "method": method,
                "dtype": dtype,
                "n_sites": len(group),
                "n_samples": len(counts),
                "sites_per_sample": float(np.median(counts)),
                "spearman": _correlation(group["estimate"], target, "spearman"),
                "pearson": _correlation(group["estimate"], target),
                "top_k": top_k,
                "recall_top10": float(np.mean(recalls)) if recalls else float("nan"),
                "misses": missed,
                "spearman_atp": _correlation(group["estimate_atp"], group["exact"], "spearman"),
                "recall_top10_atp": float(np.mean(recalls_atp)) if recalls_atp else float("nan"),
            }
        )
    validation = pd.DataFrame(rows, columns=list(VALIDATION_COLUMNS))
    empty = paired.head(0).assign(exact_rank=pd.Series(dtype=float), screen_rank=pd.Series(dtype=float))
    return validation, pd.concat(misses, ignore_index=True) if misses else empty


# -- where in the image ---------------------------------------------------------------------------
def layer_maps(effects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|sum over layers|, max over layers of |effect|) per patch, from `effects` [layers, patches]."""
    return np.abs(effects.sum(axis=0)), np.abs(effects).max(axis=0)


def object_share(effects: np.ndarray, mask: np.ndarray, grid: tuple[int, int]) -> tuple[float, float]:
    """(share of the summed image-token effect |Σ_layers| that falls on the object, object's share of the
    image): the second is what a screen blind to the object would give."""
    summed = layer_maps(effects)[0]
    on_object = object_fraction(mask, grid)
    total = float(summed.sum())
    return (float(summed @ on_object) / total if total > 0 else float("nan")), float(on_object.mean())


def object_fraction_table(records: Sequence[dict], labels: Mapping[str, str]) -> pd.DataFrame:
    """Per task: the mean over samples with a mask of `object_share`; `n_samples` counts the samples with an
    image-token effect, `n_no_effect` those without one (a corruption that leaves the image as it is)."""
    rows = []
    for record in records:
        mask = np.asarray(record["mask"])
        if not mask.size:
            continue
        grid = (int(record["grid"][0]), int(record["grid"][1]))
        share, area = object_share(np.asarray(record["effects"]), mask, grid)
        rows.append(
            {"task": record["task"], "sample_id": record["sample_id"], "effect_on_object": share, "object_area": area}
        )
    columns = [*labels, "task", "n_samples", "n_no_effect", "effect_on_object", "object_area", "ratio"]
    if not rows:
        return pd.DataFrame(columns=columns)
    table = (
        pd.DataFrame(rows)
        .groupby("task", sort=True)
        .agg(
            n_samples=("effect_on_object", "count"),
            n_no_effect=("effect_on_object", lambda share: int(share.isna().sum())),
            effect_on_object=("effect_on_object", "mean"),
            object_area=("object_area", "mean"),
        )
        .reset_index()
    )
    table["ratio"] = table["effect_on_object"] / table["object_area"]
    for column, value in labels.items():
        table[column] = value
    return table[columns]


def has_image_effect(record: Mapping) -> bool:
    return bool(np.abs(np.asarray(record["effects"])).sum() > 0)
