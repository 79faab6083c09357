"""The workflow's report and the paper's Tables 1-3: which sections, tables and figures, in which order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from notice.method.head_functions import HeadFunctionConfig, function_table, universal_head_functions
from notice.method.heads import universal_heads_by_kind, universal_heads_summary
from notice.present.circuits import skipped_summary, validation_summary
from notice.present.findings import grounding_findings, summarise_findings
from notice.present.page import Figure, Section, Table, build_report

# Caption of every figure kind that the figure modules of this package write, by file-name prefix.
FIGURE_CAPTIONS: dict[str, str] = {
    "module": "Module-wise activation patching (paper Fig. 3): mean effect of patching each module's clean "
    "output into the corrupt run, per text position (columns) and layer (rows), one panel per module.",
    "heads": "Head-wise activation patching (paper Fig. 5): mean logit-difference effect of each attention head "
    "(layer × head) per task and corruption; universal heads are lettered (V vision, T text, M multimodal) "
    "and heads above the k-sigma threshold outlined.",
    "corruptions": "Semantic image pairs against Gaussian noise (paper Fig. 4/10): the same module-wise patching "
    "under each image corruption, one row per corruption.",
    "bootstrap": "Stability of the top heads: fraction of bootstrap resamples of the samples in which each head "
    "is significant / universal, with the 95% interval of its mean effect.",
    "accuracy": "Exact-match accuracy on the clean prompts per task and category (paper Table 2).",
    "screenscatter": "Attribution screen against exact patching: each site that both have (the patching table's "
    "sites and the screen's exact confirmations), the screen's estimate against the exact logit-difference effect, "
    "one panel per site kind; the dashed line is y = x.",
    "screenmap": "Where in the image (attribution screen): per sample, the image as the model sees it with the "
    "object outlined in cyan, the screen's effect of each image token summed over layers (absolute value) and "
    "its maximum over layers, each panel scaled to its own maximum; the last row averages the maps over every "
    "sample of the task (objects move between scenes, so read it with the on-object shares).",
    "knockout": "Attention knockout (as Zhang et al., CVPR 2025): relative change of the probability of the answer, "
    "(p_knock − p_base) / p_base, when every attention edge from the target group's queries to the source group's "
    "keys is blocked in a window of consecutive layers, against the window's first layer; mean over the samples "
    "with a band of ± one standard error, one line per edge, one panel per task. A dip marks the layers where that "
    "route carries the answer.",
    "lens": "Logit lens on image tokens: per layer, the share of image positions (over the tabulated samples) whose "
    "residual, read through the final norm and unembedding, has the answer (solid) or the object word (dashed, "
    "where known) among its top 5 tokens.",
    "lensmap": "Logit-lens maps: per sample (rows) and a few layers (columns), the image grid coloured by the "
    "answer's rank among the vocabulary at each image position (bright: near the top); outlined cells hold it in "
    "their top 5. Hover a cell for its top tokens.",
    "flowablation": "Object-token ablation (as Neo et al., ICLR 2025): mean change of the logit difference when the "
    "object's image tokens are replaced by the mean image token, against as many random non-object image tokens "
    "(averaged over the draws), per task; error bars ± one standard error over the samples.",
    "circuitcurve": "Circuit faithfulness: the exact faithfulness, (m(circuit) − m(corrupt)) / (m(clean) − m(corrupt)) "
    "summed over the pairs, of the circuits made of the top-n edges by EAP (solid) and EAP-IG (dashed), against n "
    "on a log scale; one line per dataset and corruption; the dashed grey line is the target faithfulness.",
    "circuitgraph": "The smallest faithful circuit of one dataset and corruption (edges ranked by EAP-IG): inputs at "
    "the top, each layer's attention heads and MLPs, the logits at the bottom; token groups (image, question, last "
    "position, other text) as columns, a node drawn in each column it has an edge in; an edge's width is its "
    "|EAP-IG score| scaled to the largest, its colour the score's sign.",
    "circuitoverlap": "Overlap of a model's smallest faithful circuits: the edge intersection over union of every "
    "pair of (dataset, corruption) circuits.",
    "attention": "Attention patterns (paper Fig. 6/7): per sample (rows), the image with the object's mask outlined "
    "in cyan, the average over all fusion-attention heads from the head-patching position, each "
    "universal head there (with its scored function) and the best object detector (at its own query "
    "token), overlaid on the image as the model sees it; each panel is scaled to its own maximum and "
    "labelled with the share of patch attention on the object and its multiple of uniform attention.",
}


def figure_sections(model: str, figure_dir: Path) -> list[Section]:
    """One section per figure kind found in `figure_dir` (PNG files), each figure with its caption."""
    sections = []
    pngs = sorted(Path(figure_dir).glob("*.png"))
    for prefix, caption in FIGURE_CAPTIONS.items():
        figures = [Figure(png, f"{caption} File: {png.stem}.") for png in pngs if png.stem.split("_", 1)[0] == prefix]
        if figures:
            sections.append(Section(f"{model}: {prefix} figures", figures=figures))
    return sections


def write_tables(csv: pd.DataFrame, tables: Sequence[Table], csv_path: str | Path, md_path: str | Path) -> None:
    """`csv` as a CSV file; `tables` as Markdown, each under its caption in bold, in one file."""
    csv_path, md_path = Path(csv_path), Path(md_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv.to_csv(csv_path, index=False)
    parts = [
        f"**{t.caption}**\n\n" + (t.df.to_markdown(index=False, floatfmt=".4g") if len(t.df) else "(none)")
        for t in tables
    ]
    md_path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")


TABLE_FILES: tuple[str, ...] = ("table1_universal_heads", "table2_accuracy", "table3_head_functions")
NO_ACCURACY = "No accuracy rows: no clean prompt was evaluated."
NO_DETECTOR = "No best object detector: no head was scored on an image with an object mask."
NO_PAIRS = "no site has both a screen estimate and an exact effect."


def no_universal_heads(k: float, corruptions: Sequence[str]) -> str:
    """What an empty universal-heads table means (`notice.method.heads.universal_heads_table`: neither universal
    heads nor candidates, heads universal in many bootstrap resamples)."""
    return (
        f"No universal heads: no head is significant (mean effect above the mean of all heads + {k:g} SD) in every "
        "task under image corruption, nor in every task under text corruption (the corruptions that count: "
        f"{', '.join(corruptions)}), and none is often universal under bootstrap resampling."
    )


def no_head_functions(universal: pd.DataFrame) -> str:
    """What an empty head-function table means: no head to score, or none with scores (attention records are
    taken at one site per model and dataset)."""
    heads = "universal head, nor any head often universal under resampling,"
    if universal.empty:
        return f"No head functions: there is no {heads} to score."
    return f"No head functions: no {heads} has attention records at its site."


def workflow_report(
    universal: pd.DataFrame,
    significant: pd.DataFrame,
    accuracy: pd.DataFrame,
    scores: pd.DataFrame,
    grounding: pd.DataFrame,
    figure_dirs: dict[str, Path],
    settings: dict,
    out_html: str | Path,
    tables_dir: str | Path,
    screen: ScreenResults | None = None,
    precision: pd.DataFrame | None = None,
    flow: FlowResults | None = None,
    circuits: CircuitResults | None = None,
) -> Path:
    """The workflow's report and the paper's Tables 1-3 (`tables_dir`/<TABLE_FILES>.csv and .md).

    Inputs are the concatenated per-model tables: universal heads (`universal_heads_table`),
    significant heads (`significant_heads`), accuracy, head-function scores and grounding summaries;
    `figure_dirs` maps every model, in report order, to its figure directory; `settings` is the
    config's `analysis` section (with `precision_k` where a model is half precision); `screen` the attribution
    screen's tables and figures, when it ran; `precision` the precision audits of the half-precision models
    (`notice.method.precision.AUDIT_COLUMNS`), None when every model is full precision; `flow` the flow stage's
    summaries and figures, when it ran; `circuits` the circuits' tables and figures, when they ran.
    """
    config = HeadFunctionConfig.from_dict(settings["head_functions"])
    corruptions = settings["universal_corruptions"]
    k = settings["k_sigma"]
    summary = universal_heads_summary(universal, corruptions)
    functions = universal_head_functions(scores, universal)
    no_heads, no_functions = no_universal_heads(k, corruptions), no_head_functions(universal)
    table1 = [
        Table(universal_heads_by_kind(summary), "Universal heads per model and kind (paper Table 1).", no_heads),
        Table(
            summary,
            "Universal heads with bootstrap stability: fraction of resamples universal (own kind), "
            "least fraction significant over the defining conditions, widest 95% interval of the "
            "mean effect, and every defining condition.",
            no_heads,
        ),
    ]
    table2 = [Table(accuracy, "Exact-match accuracy on the clean prompts (paper Table 2).", NO_ACCURACY)]
    table3 = [
        Table(
            function_table(functions),
            "Functions of the universal heads per dataset, scored at the head-patching position (paper Table 3).",
            no_functions,
        ),
        Table(functions, "Head-function scores of the universal heads at the head-patching position.", no_functions),
    ]
    for name, csv, tables in zip(TABLE_FILES, (summary, accuracy, functions), (table1, table2, table3)):
        write_tables(csv, tables, Path(tables_dir) / f"{name}.csv", Path(tables_dir) / f"{name}.md")
    models = list(figure_dirs)
    sections = [
        Section(
            "Summary",
            html=summarise_findings(universal, accuracy, models, k, significant, corruptions)
            + grounding_findings(grounding, functions, config),
        ),
        Section("Accuracy", tables=table2),
        Section(
            "Universal heads",
            tables=[
                *table1,
                Table(universal, "Universal heads per condition.", no_heads),
                *([] if precision is None else [precision_table(precision, settings["precision_k"])]),
            ],
        ),
        Section(
            "Head functions",
            tables=[*table3, Table(grounding, "Best object detector per model, site and dataset.", NO_DETECTOR)],
        ),
    ]
    if screen is not None:
        sections.append(screen_section(screen, grounding))
    if flow is not None:
        sections.append(flow_section(flow))
    if circuits is not None:
        sections.append(circuits_section(circuits))
    for model, figure_dir in figure_dirs.items():
        sections += figure_sections(model, Path(figure_dir))
        if screen is not None and model in screen.figure_dirs:
            sections += figure_sections(f"{model} screen", screen.figure_dirs[model])
        if flow is not None and model in flow.figure_dirs:
            sections += figure_sections(f"{model} flow", flow.figure_dirs[model])
        if circuits is not None and model in circuits.figure_dirs:
            sections += figure_sections(f"{model} circuits", circuits.figure_dirs[model])
    return build_report(sections, out_html)


NO_AUDITED_ROWS = "No audited rows: the patching tables of the half-precision models have no rows."


def precision_table(audits: pd.DataFrame, k: float) -> Table:
    """The precision audits of the half-precision models' patching tables, and how the analysis reads them."""
    return Table(
        audits,
        "Precision audit of the models patched in float16 / bfloat16: per dataset, corruption and site kind, a "
        "seeded sample of the patched runs (n_audited of n_rows) patched again by the reference engine on the model "
        "in float32 (on audit_device); median, 95th percentile (p95) and maximum of |logit_diff − float32 "
        "logit_diff|, next to the effects' spread (their standard deviation). Rounding alone moves an effect by up "
        f"to about p95: a head or module whose mean effect is not above {k:g} × p95 is marked below_precision in "
        "the head tables and never counted as significant.",
        NO_AUDITED_ROWS,
    )


@dataclass(frozen=True)
class ScreenResults:
    """The attribution screen's outputs over every model (`notice.method.screen`): validation, misses and
    on-object shares, concatenated; the figure directory of each model; the precision audits of the
    half-precision models' screens (AUDIT_COLUMNS of their estimates; None when every model is full precision)."""

    validation: pd.DataFrame
    misses: pd.DataFrame
    object_fraction: pd.DataFrame
    figure_dirs: dict[str, Path]
    precision: pd.DataFrame | None = None


def screen_section(screen: ScreenResults, grounding: pd.DataFrame) -> Section:
    """Validation table, the on-object share of the image-token effect next to the best object detector
    of the head functions, and the largest misses."""
    fractions = screen.object_fraction
    keys = [key for key in ("model", "dataset", "task") if key in grounding.columns]
    if len(fractions) and len(grounding) and keys and "best_detection" in grounding.columns:
        # both are multiples of uniform (share on the object / object area): comparable side by side
        best = grounding.groupby(keys, as_index=False)["best_detection"].max()
        fractions = fractions.merge(best.rename(columns={"best_detection": "head_best_detection"}), on=keys, how="left")
    misses = screen.misses.copy()
    if len(misses):
        misses = misses.reindex(misses["exact"].abs().sort_values(ascending=False).index).head(20)
        misses = misses[
            [
                "model",
                "dataset",
                "corruption",
                "sample_id",
                "site",
                "layer",
                "head",
                "position",
                "token",
                "exact",
                "estimate",
                "exact_rank",
                "screen_rank",
            ]
        ]
    return Section(
        "Attribution screen",
        html="<p>Attribution patching estimates every site at every position (image tokens included) from one "
        "clean forward, one corrupt forward and one backward pass; these tables say how well it agrees with "
        "exact patching wherever both exist (docs/method.md, §9).</p>",
        tables=[
            Table(
                screen.validation,
                "Screen against exact patching per site kind: correlations, top-10 recall "
                "within the screen's top k, and misses (exact top-10 sites outside it).",
                f"No validation rows: {NO_PAIRS}",
            ),
            Table(
                fractions,
                "Share of the image-token effect (|Σ over layers|) that falls on the object, its "
                "object-area baseline and ratio, next to the best object-detection score of the head functions.",
                "No object shares: no screened sample has an object mask.",
            ),
            Table(
                misses,
                "The largest misses: exact effect in a sample's top 10, screen estimate outside its top k.",
                f"No misses: {NO_PAIRS}"
                if screen.validation.empty
                else "No misses: in every sample with more than k sites of a kind, the sites of its exact top 10 "
                "are within the screen's top k.",
            ),
            *([] if screen.precision is None else [screen_precision_table(screen.precision)]),
        ],
    )


def screen_precision_table(audits: pd.DataFrame) -> Table:
    """The precision audits of the half-precision models' screens."""
    return Table(
        audits,
        "Precision audit of the screen of the models in float16 / bfloat16 (the validation's dtype): every estimate "
        "of the pairs of the patching audit, recomputed on the model in float32 (on audit_device); per site kind "
        "the median, 95th percentile and maximum of |estimate − float32 estimate| over those pairs' estimates "
        "(n_audited of n_rows), next to the spread of all the estimates (their standard deviation).",
        "No audited estimates: the screen tables of the half-precision models have no rows.",
    )


FLOW_TITLE = "How the image reaches the answer"


@dataclass(frozen=True)
class FlowResults:
    """The flow stage's outputs over every model (`notice.present.flow`): the ablation summary and what was
    skipped, concatenated; the figure directory of each model."""

    ablation: pd.DataFrame
    skipped: pd.DataFrame
    figure_dirs: dict[str, Path]


def flow_section(flow: FlowResults) -> Section:
    """The object-token ablation per task, and every sample × edge or analysis that could not be computed."""
    return Section(
        FLOW_TITLE,
        html="<p>On the clean prompt of every selected sample: attention knockout between token groups (image, "
        "object, question, last position, other text) over windows of consecutive layers, the logit lens read at "
        "the image positions, and the object's image tokens ablated against as many random ones. The knockout "
        "curves and logit-lens maps are in each model's flow figures below.</p>",
        tables=[
            Table(
                flow.ablation,
                "Object-token ablation per task: the object's image tokens (object) or as many random non-object "
                "image tokens (random, averaged over the draws) replaced by the mean image token; mean change of the "
                "logit difference with its standard error over the samples, and the accuracy before and after.",
                "No ablation rows: no sample has an object mask covering an image patch.",
            ),
            Table(
                flow.skipped,
                "Skipped: samples whose edge or analysis could not be computed, and why (an edge with an empty token "
                "group, no object mask, no one-word object name for the logit lens).",
                "Nothing skipped: every edge and analysis was computed on every sample.",
            ),
        ],
    )


@dataclass(frozen=True)
class CircuitResults:
    """The circuits' outputs over every model (`notice.method.circuits`), concatenated: each circuit's summary,
    validation and skipped pairs, each model's overlap and shared heads; the figure directory of each model."""

    summary: pd.DataFrame
    validation: pd.DataFrame
    skipped: pd.DataFrame
    overlap: pd.DataFrame
    shared_heads: pd.DataFrame
    figure_dirs: dict[str, Path]


SUMMARY_SHOWN: tuple[str, ...] = (
    "model",
    "dataset",
    "corruption",
    "method",
    "n_pairs",
    "n_edges",
    "cpr",
    "cmd",
    "target",
    "smallest_n",
    "smallest_faithfulness",
)


def circuits_section(circuits: CircuitResults) -> Section:
    """Per circuit: CPR, CMD and the smallest faithful circuit, the scores' validation, the pairs skipped; per model:
    the circuits' overlap and the heads in every circuit next to the universal heads."""
    return Section(
        "Circuits",
        html="<p>Edges between nodes (the image and text inputs, attention heads, MLPs, the logits), over token "
        "groups, scored by edge attribution patching (EAP) and its integrated-gradients version (EAP-IG); circuits "
        "of the top-ranked edges are run exactly, every other edge given its corrupt value, to measure their "
        "faithfulness (docs/method.md, §12). The curves and each smallest faithful circuit are in each model's "
        "circuit figures below.</p>",
        tables=[
            Table(
                circuits.summary[list(SUMMARY_SHOWN)],
                "Circuits per dataset, corruption and scoring method: pairs used, edges of the graph, CPR (area under "
                "the faithfulness curve over the fraction of edges kept; higher is better) and CMD (area between it "
                "and 1; lower is better), and the smallest top-n circuit reaching the target faithfulness.",
                "No circuits: no pair could be used (see the skipped pairs).",
            ),
            Table(
                validation_summary(circuits.validation),
                "Scores against exact single-edge ablation on a seeded sample of each pair's edges: mean Spearman "
                "correlation over the pairs (pairs where it is undefined counted apart) and mean top-k recall.",
                "No validation rows: no pair could be used.",
            ),
            Table(
                circuits.overlap,
                "Overlap of each model's smallest faithful circuits (EAP-IG): intersection over union (iou) and over "
                "the smaller circuit (overlap), of edges and of nodes.",
                "No overlap rows: no circuit.",
            ),
            Table(
                circuits.shared_heads,
                "Heads in every circuit of a model, and whether each is one of its universal heads (of which kind).",
                "No head is in every circuit of any model.",
            ),
            Table(
                skipped_summary(circuits.skipped),
                "Pairs skipped per circuit, and why (beyond circuits.max_pairs, a corruption that leaves the logit "
                "difference unchanged, a graph unlike the first pair's).",
                "Nothing skipped: every pair was used.",
            ),
        ],
    )
