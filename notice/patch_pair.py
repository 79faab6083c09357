"""`python -m notice patch-pair`: the default patch set of one (clean, corrupt) pair, as the workflow runs it.

Users try one example before a 500-sample run, and a new model family is checked this way. So the pair
is built as a one-row corruption manifest (tables.PAIR_COLUMNS) and goes through the workflow's own
`cache_clean_runs` + `patch_pairs`: the rows are the workflow's results rows by construction. In half precision,
`--audit N` runs the workflow's precision audit (notice.method.precision) on N of those rows.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import pandas as pd
import torch

from notice.adapters.base import VLMAdapter
from notice.adapters.loading import load_adapter
from notice.files.tables import PAIR_COLUMNS, RESULT_COLUMNS, make_table, write_csv, write_table
from notice.method.pairs import NO_NOISE, PAIR_DTYPES
from notice.method.precision import (
    AUDIT_ROW_COLUMNS,
    audit_sample,
    audit_summary_lines,
    is_half,
    summarise_audit,
)
from notice.method.precision_audit import audit_rows
from notice.patching.engines import ENGINES, get_engine
from notice.patching.experiment import cache_clean_runs, patch_pairs
from notice.patching.fast import DEFAULT_BATCH_ROWS
from notice.workflow.runtime import load_image

SAMPLE_ID = "pair"
LABEL = "cli"  # task, category and dataset of the one pair
NOISES = ("gn_mult", "gn_add")
TOP_SITES = 5
# The defaults of the options that are config keys too: the schema's (patching.engine, corruptions.gn_mult.nu,
# corruptions.gn_add.sigma_multiplier; patching.batch_size is fast.DEFAULT_BATCH_ROWS), and every site patched.
DEFAULT_ENGINE = "fast"
DEFAULT_NU = 5.0
DEFAULT_SIGMA_MULTIPLIER = 3.0
PATCH_SET = {"module_sites": True, "head_sites": True}
DTYPES = ("float32", "float64", "bfloat16", "float16")
AUDIT_SEED = 0


class InputError(ValueError):
    """The command line asks for something that cannot be run; the CLI prints the message as one line."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `patch-pair`; exactly one corruption is enforced by argparse."""
    parser.add_argument("--model", required=True, help="Hugging Face id (in the local cache) or model directory")
    parser.add_argument("--image", required=True, help="clean image")
    parser.add_argument("--question", required=True, help="question naming both options")
    parser.add_argument("--answer", required=True, help="correct option")
    parser.add_argument("--distractor", required=True, help="incorrect option")
    corruption = parser.add_mutually_exclusive_group(required=True)
    corruption.add_argument("--corrupt-image", help="SIP: the corrupt image (question unchanged)")
    corruption.add_argument("--corrupt-question", help="STR: the corrupt question (same token length)")
    corruption.add_argument("--noise", choices=NOISES, help="Gaussian noise on the image embeddings")
    parser.add_argument("--prompt-template", help="prompt with {question}, used verbatim (default: the model's)")
    parser.add_argument("--adapter", help="adapter family, e.g. an opt-in stream (default: the model type's)")
    parser.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE)
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="the model's dtype (scores are float32 in every dtype)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--nu", type=float, default=DEFAULT_NU, help="gn_mult: noise scale")
    parser.add_argument("--sigma-multiplier", type=float, default=DEFAULT_SIGMA_MULTIPLIER, help="gn_add: noise scale")
    parser.add_argument("--noise-seed", type=int, default=0, help="seed of the Gaussian noise draw")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_ROWS,
        help=f"fast engine: patched runs per forward pass (default {DEFAULT_BATCH_ROWS})",
    )
    parser.add_argument("--out", required=True, help="results table (Parquet, tables.RESULT_COLUMNS)")
    parser.add_argument(
        "--audit",
        type=int,
        default=0,
        metavar="N",
        help="bfloat16 / float16: patch N seeded rows (at least one per site kind) again on the model in float32 and "
        "print the rounding per site kind; writes <stem>.precision.csv and <stem>.precision_rows.parquet next to --out "
        "(default 0: no audit)",
    )
    parser.add_argument(
        "--audit-seed", type=int, default=AUDIT_SEED, help=f"seed of the audit's rows (default {AUDIT_SEED})"
    )


def corruption_of(args: argparse.Namespace) -> str:
    """The workflow's name of the corruption the command line asks for."""
    if args.corrupt_image is not None:
        return "sip"
    if args.corrupt_question is not None:
        return "str"
    return args.noise


def option_token_ids(adapter: VLMAdapter, answer: str, distractor: str) -> tuple[int, int]:
    """First tokens of both options; equal ones would make every logit difference 0."""
    try:
        answer_id, distractor_id = adapter.option_token_id(answer), adapter.option_token_id(distractor)
    except ValueError as error:  # e.g. an empty option: no tokens
        raise InputError(str(error)) from error
    if answer_id == distractor_id:
        token = adapter.processor.tokenizer.convert_ids_to_tokens(answer_id)
        raise InputError(
            f"answer {answer!r} and distractor {distractor!r} have the same first token {token!r} (id {answer_id})"
        )
    return answer_id, distractor_id


def check_token_length(adapter: VLMAdapter, clean_prompt: str, corrupt_prompt: str) -> None:
    """STR needs clean and corrupt positions to line up one to one, as the workflow's STR pairs do."""
    tokenize = adapter.processor.tokenizer
    clean, corrupt = len(tokenize(clean_prompt)["input_ids"]), len(tokenize(corrupt_prompt)["input_ids"])
    if clean != corrupt:
        raise InputError(
            f"the corrupt question's prompt has {corrupt} tokens but the clean prompt has {clean}; "
            "STR needs the same token length"
        )


def build_pair(
    adapter: VLMAdapter,
    image: str,
    question: str,
    answer: str,
    distractor: str,
    corruption: str,
    corrupt_image: str | None = None,
    corrupt_question: str | None = None,
    noise_seed: int = 0,
) -> pd.DataFrame:
    """The one-row corruption manifest (PAIR_COLUMNS) of the pair, as notice.method.pairs builds its rows."""
    answer_id, distractor_id = option_token_ids(adapter, answer, distractor)
    clean_prompt = adapter.format_prompt(question)
    corrupt_prompt = clean_prompt
    if corrupt_question is not None:
        corrupt_prompt = adapter.format_prompt(corrupt_question)
        check_token_length(adapter, clean_prompt, corrupt_prompt)
    row = {
        "sample_id": SAMPLE_ID,
        "task": LABEL,
        "category": LABEL,
        "corruption": corruption,
        "modality": "text" if corruption == "str" else "image",
        # Metadata only (patching does not read it): whether the answer is named before the distractor.
        "correct_first": question.find(answer) <= question.find(distractor),
        "answer": answer,
        "distractor": distractor,
        "answer_token_id": answer_id,
        "distractor_token_id": distractor_id,
        "clean_image_path": image,
        "corrupt_image_path": corrupt_image or image,
        "clean_mask_path": "",
        "corrupt_mask_path": "",
        "clean_prompt": clean_prompt,
        "corrupt_prompt": corrupt_prompt,
        "noise_seed": noise_seed if corruption in NOISES else NO_NOISE,
    }
    return make_table([row], PAIR_COLUMNS, PAIR_DTYPES)


def check_input_lengths(adapter: VLMAdapter, pairs: pd.DataFrame) -> None:
    """The engines patch position by position, so clean and corrupt inputs need the same length; a SIP
    image of another size can give another number of image tokens (any-resolution and native-resolution families)."""

    def length(image: str, prompt: str) -> int:  # adapter.prepare's tokens, without moving them to a device
        return adapter.processor(images=load_image(image), text=prompt, return_tensors="pt")["input_ids"].shape[1]

    for pair in pairs.itertuples(index=False):
        clean = length(pair.clean_image_path, pair.clean_prompt)
        corrupt = length(pair.corrupt_image_path, pair.corrupt_prompt)
        if clean != corrupt:
            raise InputError(
                f"the corrupt input has {corrupt} tokens but the clean input has {clean} "
                "(an image of another size gives another number of image tokens); positions would not line up"
            )


def prompts_of(pairs: pd.DataFrame) -> pd.DataFrame:
    """The clean prompts `cache_clean_runs` needs (sample_id, image_path, prompt) of the pairs."""
    return pd.DataFrame(
        {
            "sample_id": pairs["sample_id"],
            "image_path": pairs["clean_image_path"],
            "prompt": pairs["clean_prompt"],
        }
    )


def tokenizing_adapter(args: argparse.Namespace) -> VLMAdapter:
    """The model's adapter without weights (as the workflow's prompt stages load it), so that bad input
    fails in a second, before a large model's weights are read.

    load_adapter's ValueError (e.g. an unknown model type) becomes an InputError.
    """
    if args.prompt_template is not None and "{question}" not in args.prompt_template:
        raise InputError(f"--prompt-template {args.prompt_template!r} has no {{question}}")
    try:
        return load_adapter(args.model, prompt_template=args.prompt_template, weights=False, adapter=args.adapter)
    except ValueError as error:
        raise InputError(str(error)) from error


def check_images(*paths: str | None) -> None:
    """Decode every given image once, so an unreadable one fails before the model loads."""
    for path in paths:
        if path is None:
            continue
        try:
            load_image(path)
        except ValueError as error:  # runtime.load_image names the file
            raise InputError(str(error)) from error


def check_audit(args: argparse.Namespace) -> None:
    """`--audit` needs a half-precision `--dtype`: a full-precision run has no rounding to measure."""
    if args.audit < 0:
        raise InputError(f"--audit {args.audit}: the number of rows to audit cannot be negative")
    if args.audit > 0 and not is_half(args.dtype):
        raise InputError(
            f"--audit needs --dtype bfloat16 or float16; a {args.dtype} run has no half-precision rounding to audit"
        )


def corruption_settings(args: argparse.Namespace) -> dict[str, float]:
    return {"nu": args.nu, "sigma_multiplier": args.sigma_multiplier}


def audit_paths(out: str) -> tuple[Path, Path]:
    """(audit summary CSV, audited rows Parquet) next to the results table: `<stem>.precision.csv`,
    `<stem>.precision_rows.parquet`."""
    path = Path(out)
    return path.with_name(f"{path.stem}.precision.csv"), path.with_name(f"{path.stem}.precision_rows.parquet")


def patch(args: argparse.Namespace, pairs: pd.DataFrame) -> pd.DataFrame:
    """The results rows of `pairs` on the model in `--dtype` (freed on return)."""
    adapter = load_adapter(args.model, args.device, args.dtype, args.prompt_template, adapter=args.adapter)
    with torch.inference_mode():
        clean_runs = cache_clean_runs(adapter, prompts_of(pairs), load_image)
        return patch_pairs(
            adapter,
            pairs,
            clean_runs,
            load_image,
            engine=get_engine(args.engine, args.batch_size),
            corruption_settings=corruption_settings(args),
            patching_settings=PATCH_SET,
            labels={"model": args.model, "dataset": LABEL},
        )


def audit(args: argparse.Namespace, pairs: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """The precision audit of `rows` (notice.method.precision): `--audit` seeded rows patched again by the
    reference engine on the model loaded in float32 on the same device; writes the audited rows and the summary
    (`audit_paths`) and returns the summary (AUDIT_COLUMNS, one row per site kind)."""
    gc.collect()  # the half-precision model, before the float32 one loads
    full = load_adapter(args.model, args.device, "float32", args.prompt_template, adapter=args.adapter)
    sample = audit_sample(rows, args.audit, args.audit_seed)
    with torch.inference_mode():
        audited = audit_rows(full, pairs, sample, load_image, corruption_settings(args))
    summary = summarise_audit(audited, rows, args.dtype, args.device)
    summary_path, rows_path = audit_paths(args.out)
    write_table(audited, rows_path, AUDIT_ROW_COLUMNS)
    write_csv(summary, summary_path)
    return summary


def run(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Patch the pair of `args` with the workflow's functions, write the results table (and with `--audit` the
    precision audit); return its rows and the audit's summary (None without `--audit`)."""
    check_audit(args)
    check_images(args.image, args.corrupt_image)
    tokenizing = tokenizing_adapter(args)
    pairs = build_pair(
        tokenizing,
        args.image,
        args.question,
        args.answer,
        args.distractor,
        corruption_of(args),
        corrupt_image=args.corrupt_image,
        corrupt_question=args.corrupt_question,
        noise_seed=args.noise_seed,
    )
    check_input_lengths(tokenizing, pairs)
    rows = patch(args, pairs)
    write_table(rows, args.out, RESULT_COLUMNS)
    return rows, (audit(args, pairs, rows) if args.audit > 0 else None)


def summary(rows: pd.DataFrame) -> str:
    """LD clean / LD corrupt, the number of patched runs and the top sites by logit_diff."""
    first = rows.iloc[0]
    top = rows.nlargest(TOP_SITES, "logit_diff")[["site", "layer", "head", "position", "token", "logit_diff"]]
    return "\n".join(
        [
            f"LD clean {first.ld_clean:.4f} / LD corrupt {first.ld_corrupt:.4f}",
            f"{len(rows)} patched runs; top {len(top)} by logit_diff:",
            top.to_string(index=False, float_format="{:.4f}".format),
        ]
    )


def audit_report(args: argparse.Namespace, audit_summary: pd.DataFrame) -> str:
    """The audit's header, one line per site kind (`audit_summary_lines`) and where its files are."""
    summary_path, rows_path = audit_paths(args.out)
    n_audited, n_rows = int(audit_summary["n_audited"].sum()), int(audit_summary["n_rows"].sum())
    return "\n".join(
        [
            f"precision audit: {n_audited} of the {n_rows} rows (seed {args.audit_seed}) patched again in float32:",
            *audit_summary_lines(audit_summary),
            f"precision audit: {summary_path}, {rows_path}",
        ]
    )


def command(args: argparse.Namespace) -> None:
    """The `patch-pair` subcommand: run, then print the summary, the audit and where the tables are."""
    rows, audit_summary = run(args)
    print(summary(rows))
    print(f"results: {args.out}")
    if audit_summary is not None:
        print(audit_report(args, audit_summary))
