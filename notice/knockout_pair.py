"""`python -m notice knockout-pair`: attention knockout between token groups on one image and question.

Every edge of `--edges` is blocked in a window of `--window` consecutive layers at every window start
(notice.flow.knockout), scored on the clean run; the rows are the workflow's knockout table columns
(`KNOCKOUT_COLUMNS`). The options are checked as `patch-pair` checks them (its helpers), before the weights load.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from PIL import Image

from notice.adapters.base import ModelInput, VLMAdapter, model_input
from notice.adapters.loading import load_adapter
from notice.files.tables import write_table
from notice.flow.groups import TokenGroups, token_groups
from notice.flow.knockout import (
    DEFAULT_EDGES,
    ENGINES,
    KNOCKOUT_COLUMNS,
    default_window,
    edges_without_rows,
    knockout_rows,
    parse_edges,
)
from notice.patch_pair import DTYPES, InputError, check_images, option_token_ids, tokenizing_adapter
from notice.workflow.runtime import load_image

DEFAULT_BATCH_SIZE = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face id (in the local cache) or model directory")
    parser.add_argument("--image", required=True, help="the image")
    parser.add_argument("--question", required=True, help="question naming both options")
    parser.add_argument("--answer", required=True, help="correct option")
    parser.add_argument("--distractor", required=True, help="incorrect option")
    parser.add_argument("--object-mask", help="the object's mask (white on black, the image's size): 'object' edges")
    parser.add_argument("--prompt-template", help="prompt with {question}, used verbatim (default: the model's)")
    parser.add_argument("--adapter", help="adapter family, e.g. an opt-in stream (default: the model type's)")
    parser.add_argument("--window", type=int, help="layers per window (default: about a quarter of the layers)")
    parser.add_argument(
        "--edges",
        help=f"source:target edges, comma-separated (default {','.join(DEFAULT_EDGES)}, those the model has)",
    )
    parser.add_argument("--engine", choices=ENGINES, default="fast")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="the model's dtype (scores are float32 in every dtype)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"fast engine: knocked-out runs per forward pass (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument("--out", required=True, help="knockout table (Parquet, KNOCKOUT_COLUMNS)")


def requested_edges(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    try:
        return parse_edges(args.edges if args.edges is not None else DEFAULT_EDGES)
    except ValueError as error:
        raise InputError(f"--edges: {error}") from error


def groups_of(args: argparse.Namespace, adapter: VLMAdapter, inp: ModelInput) -> TokenGroups:
    mask = None
    if args.object_mask is not None:
        mask = adapter.mask_view(Image.open(args.object_mask), inp)
    try:
        return token_groups(adapter, inp, args.question, mask)
    except ValueError as error:  # e.g. a question the prompt template does not hold
        raise InputError(str(error)) from error


def run(args: argparse.Namespace) -> tuple[pd.DataFrame, dict[tuple[str, str], str]]:
    """Knock out the edges of `args` on its image and question, write the table; return its rows and why the
    edges without rows have none. The input is checked on the model without weights, before they load."""
    edges = requested_edges(args)
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: at least 1 run per forward pass")
    check_images(args.image, args.object_mask)
    tokenizing = tokenizing_adapter(args)
    tau, tau_p = option_token_ids(tokenizing, args.answer, args.distractor)
    window = args.window if args.window is not None else default_window(tokenizing.n_layers)
    if not 1 <= window <= tokenizing.n_layers:
        raise InputError(f"--window {window}: the model has {tokenizing.n_layers} layers")
    prompt = tokenizing.format_prompt(args.question)
    encoding = tokenizing.processor(images=load_image(args.image), text=prompt, return_tensors="pt")
    on_cpu = model_input(encoding, tokenizing.processor.tokenizer, torch.device("cpu"), torch.float32)
    groups = groups_of(args, tokenizing, on_cpu)  # positions: the same on the model's device
    skipped = edges_without_rows(tokenizing, on_cpu, groups, edges)
    for (source, target), reason in skipped.items():
        # An edge asked for by name and refused is bad input; the default edges a family cannot have are noted.
        if args.edges is not None and groups.positions[source] and groups.positions[target]:
            raise InputError(f"--edges {source}:{target}: {reason}")
    kept = [edge for edge in edges if edge not in skipped]
    adapter = load_adapter(args.model, args.device, args.dtype, args.prompt_template, adapter=args.adapter)
    inp = adapter.prepare(load_image(args.image), prompt)
    with torch.inference_mode():
        rows = knockout_rows(adapter, inp, tau, tau_p, groups, kept, window, args.engine, args.batch_size)
    write_table(rows, args.out, KNOCKOUT_COLUMNS)
    return rows, skipped


def summary(rows: pd.DataFrame, skipped: dict[tuple[str, str], str]) -> str:
    """p and LD of the base run, the number of knocked-out runs and each edge's strongest window."""
    lines = [f"{source}:{target}: no rows ({reason})" for (source, target), reason in skipped.items()]
    if rows.empty:
        return "\n".join([*lines, "no knocked-out runs"])
    first = rows.iloc[0]
    lines += [
        f"p base {first.p_base:.4f} / LD base {first.ld_base:.4f}",
        f"{len(rows)} knocked-out runs (window {first.window}); per edge, its window of largest |relative_change|:",
    ]
    for (source, target), edge in rows.groupby(["source", "target"], sort=False):
        top = edge.loc[edge["relative_change"].abs().idxmax()]
        lines.append(
            f"{source}:{target}: layers {top.layer_start}..{top.layer_start + top.window - 1} "
            f"relative_change {top.relative_change:+.4f}, LD {top.ld_knock:.4f}"
        )
    return "\n".join(lines)


def command(args: argparse.Namespace) -> None:
    """The `knockout-pair` subcommand: run, then print the summary and where the table is."""
    rows, skipped = run(args)
    print(summary(rows, skipped))
    print(f"knockout rows: {args.out}")
