"""`python -m notice patch-pair` on tiny local models of every family.

The CLI's table must be exactly what the workflow's patching stage (cache_clean_runs + patch_pairs)
gives for the same pair (in float32 and bfloat16), the precision audit of a bfloat16 run must be rows of that
table recomputed in float32, and bad input must be one line on stderr with exit code 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from toy_adapters import DEFAULT_FAMILIES, QUESTION, STR_QUESTION, one_torch_thread, save_tiny_models
from transformers import BertConfig

from notice.__main__ import main
from notice.adapters.loading import load_adapter
from notice.families import default_family, families
from notice.files.tables import PAIR_COLUMNS, RESULT_COLUMNS, make_table, read_table, write_table
from notice.method.pairs import PAIR_DTYPES
from notice.method.precision import AUDIT_COLUMNS, AUDIT_ROW_COLUMNS, audit_summary_lines
from notice.patching.engines import get_engine
from notice.patching.experiment import cache_clean_runs, patch_pairs
from notice.workflow.runtime import load_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny model directories of every family (its tiny builder in the family table) and random images."""
    root = tmp_path_factory.mktemp("patch_pair")
    save_tiny_models(root, DEFAULT_FAMILIES)
    rng = np.random.default_rng(0)
    sizes = {"clean": (32, 32), "wide": (40, 24), "wide_corrupt": (40, 24)}
    for name, (width, height) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / f"{name}.png")
    (root / "not_an_image.png").write_text("not an image")
    BertConfig().save_pretrained(root / "bert")
    return root


def images(tmp: Path) -> tuple[str, str]:
    """(clean, SIP corrupt) image paths: 40x24, so any-resolution families see a wide image and the others
    resize one."""
    return str(tmp / "wide.png"), str(tmp / "wide_corrupt.png")


def cli_args(tmp: Path, family: str, corruption: str, out: Path, *extra: str) -> list[str]:
    clean, corrupt = images(tmp)
    corrupt_args = {
        "sip": ["--corrupt-image", corrupt],
        "str": ["--corrupt-question", STR_QUESTION],
        "gn_mult": ["--noise", "gn_mult"],
        "gn_add": ["--noise", "gn_add"],
    }[corruption]
    return [
        "patch-pair",
        "--model",
        str(tmp / family),
        "--image",
        clean,
        "--question",
        QUESTION,
        "--answer",
        "red",
        "--distractor",
        "green",
        *corrupt_args,
        "--out",
        str(out),
        *extra,
    ]


def expected_rows(
    tmp: Path,
    family: str,
    corruption: str,
    engine: str = "fast",
    prompt_template: str | None = None,
    noise_seed: int = 0,
    dtype: str = "float32",
    adapter_name: str | None = None,
) -> pd.DataFrame:
    """The workflow's patching stage on the same pair, built here by hand, through a Parquet file."""
    adapter = load_adapter(str(tmp / family), dtype=dtype, prompt_template=prompt_template, adapter=adapter_name)
    clean, corrupt = images(tmp)
    prompt = adapter.format_prompt(QUESTION)
    pair = {
        "sample_id": "pair",
        "task": "cli",
        "category": "cli",
        "corruption": corruption,
        "modality": "text" if corruption == "str" else "image",
        "correct_first": True,
        "answer": "red",
        "distractor": "green",
        "answer_token_id": adapter.option_token_id("red"),
        "distractor_token_id": adapter.option_token_id("green"),
        "clean_image_path": clean,
        "corrupt_image_path": corrupt if corruption == "sip" else clean,
        "clean_mask_path": "",
        "corrupt_mask_path": "",
        "clean_prompt": prompt,
        "corrupt_prompt": adapter.format_prompt(STR_QUESTION) if corruption == "str" else prompt,
        "noise_seed": noise_seed if corruption.startswith("gn_") else -1,
    }
    pairs = make_table([pair], PAIR_COLUMNS, PAIR_DTYPES)
    prompts = pd.DataFrame({"sample_id": ["pair"], "image_path": [clean], "prompt": [prompt]})
    with torch.inference_mode():
        rows = patch_pairs(
            adapter,
            pairs,
            cache_clean_runs(adapter, prompts, load_image),
            load_image,
            engine=get_engine(engine, 64),
            corruption_settings={"nu": 5.0, "sigma_multiplier": 3.0},
            patching_settings={"module_sites": True, "head_sites": True},
            labels={"model": str(tmp / family), "dataset": "cli"},
        )
    path = tmp / f"expected_{family}_{adapter_name}_{corruption}_{engine}_{dtype}.parquet"
    write_table(rows, path, RESULT_COLUMNS)
    return read_table(path, RESULT_COLUMNS)


def assert_same_rows(out: Path, expected: pd.DataFrame) -> pd.DataFrame:
    """Same columns in the same order, same rows, every value equal."""
    actual = read_table(out, RESULT_COLUMNS)
    assert list(actual.columns) == list(RESULT_COLUMNS)
    assert len(actual) > 0
    pd.testing.assert_frame_equal(actual, expected, check_exact=True)
    return actual


@pytest.mark.parametrize("corruption", ["sip", "str", "gn_mult"])
@pytest.mark.parametrize("family", DEFAULT_FAMILIES)
def test_rows_are_the_workflows(tmp: Path, family: str, corruption: str, capsys: pytest.CaptureFixture) -> None:
    out = tmp / f"out_{family}_{corruption}.parquet"
    assert main(cli_args(tmp, family, corruption, out)) == 0
    rows = assert_same_rows(out, expected_rows(tmp, family, corruption))
    printed = capsys.readouterr().out
    assert f"{len(rows)} patched runs" in printed
    assert f"LD clean {rows.ld_clean.iloc[0]:.4f} / LD corrupt {rows.ld_corrupt.iloc[0]:.4f}" in printed
    best = rows.loc[rows.logit_diff.idxmax()]
    assert f"{best.site}" in printed and str(best.token) in printed


# Every family's tiny directory, and the opt-in streams (`--adapter`) on their model type's default family's.
AUDITED = [(name, None) for name in DEFAULT_FAMILIES] + [
    (default_family(row.model_types[0]).name, row.name) for row in families() if row.opt_in
]


@pytest.mark.parametrize("family, adapter_name", AUDITED)
def test_bfloat16_run_and_its_precision_audit(
    tmp: Path, family: str, adapter_name: str | None, capsys: pytest.CaptureFixture
) -> None:
    out = tmp / f"out_bfloat16_{family}_{adapter_name}.parquet"
    stream = ["--adapter", adapter_name] if adapter_name else []
    capsys.readouterr()
    assert main(cli_args(tmp, family, "sip", out, "--dtype", "bfloat16", "--audit", "64", *stream)) == 0
    rows = assert_same_rows(out, expected_rows(tmp, family, "sip", dtype="bfloat16", adapter_name=adapter_name))
    summary = pd.read_csv(out.with_name(f"{out.stem}.precision.csv"), keep_default_na=False)
    audited = read_table(out.with_name(f"{out.stem}.precision_rows.parquet"), AUDIT_ROW_COLUMNS)
    assert list(summary.columns) == list(AUDIT_COLUMNS) and list(audited.columns) == list(AUDIT_ROW_COLUMNS)
    # One summary row per site kind of the table, each audited at least once, 64 rows at most in all.
    assert sorted(summary.site) == sorted(rows.site.unique()) and summary.n_rows.sum() == len(rows)
    assert (summary.n_audited >= 1).all() and len(summary) <= summary.n_audited.sum() == len(audited) <= 64
    assert set(summary.dtype) == {"bfloat16"} and set(summary.audit_dtype) == {"float32"}
    assert set(summary.audit_device) == {"cpu"}
    assert (summary["max"] >= summary.p95).all() and (summary.p95 >= summary["median"]).all()
    assert (summary["median"] >= 0).all() and summary["max"].max() > 0  # bfloat16 rounds
    # The audited rows are rows of the table with its logit_diff; their float32 logit_diff is the float32 run's.
    keys = ["site", "layer", "head", "position"]
    ran = audited.merge(rows, on=keys, suffixes=("", "_table"), validate="one_to_one")
    assert len(ran) == len(audited) and (ran.logit_diff == ran.logit_diff_table).all()
    assert (audited.abs_error == (audited.logit_diff - audited.logit_diff_float32).abs()).all()
    full = audited.merge(expected_rows(tmp, family, "sip", adapter_name=adapter_name), on=keys, suffixes=("", "_32"))
    assert len(full) == len(audited)  # the fast engine in float32 against the audit's reference engine:
    np.testing.assert_allclose(full.logit_diff_float32, full.logit_diff_32, rtol=1e-5, atol=2e-5)
    printed = capsys.readouterr().out.splitlines()
    start = printed.index(f"precision audit: {len(audited)} of the {len(rows)} rows (seed 0) patched again in float32:")
    assert printed[start + 1 : start + 1 + len(summary)] == list(audit_summary_lines(summary))


def test_reference_engine_and_additive_noise(tmp: Path) -> None:
    out = tmp / "out_reference.parquet"
    assert main(cli_args(tmp, "llava", "gn_add", out, "--engine", "reference", "--noise-seed", "7")) == 0
    assert_same_rows(out, expected_rows(tmp, "llava", "gn_add", engine="reference", noise_seed=7))


@pytest.mark.parametrize(
    "family, template",
    [
        ("llava", "USER: <image>\nquestion: {question} ASSISTANT:"),
        ("qwen2_vl", "<|vision_start|><|image_pad|><|vision_end|>{question}"),
    ],
)
def test_prompt_template_is_used_verbatim(tmp: Path, family: str, template: str) -> None:
    out = tmp / f"out_template_{family}.parquet"
    assert main(cli_args(tmp, family, "str", out, "--prompt-template", template)) == 0
    rows = assert_same_rows(out, expected_rows(tmp, family, "str", prompt_template=template))
    adapter = load_adapter(str(tmp / family))
    image = load_image(images(tmp)[0])
    tokens = adapter.prepare(image, template.replace("{question}", QUESTION)).tokens
    assert all(tokens[row.position] == row.token for row in rows.itertuples())
    default = adapter.prepare(image, adapter.format_prompt(QUESTION)).tokens
    assert len(tokens) < len(default) and "<|im_start|>" not in tokens  # no chat template on top


def test_entry_point(tmp: Path) -> None:
    out = tmp / "out_subprocess.parquet"
    done = subprocess.run(  # on one thread like the in-process expectation, so the floats are the same
        [sys.executable, "-m", "notice", *cli_args(tmp, "blip", "sip", out)],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "LD clean" in done.stdout and "patched runs" in done.stdout
    assert_same_rows(out, expected_rows(tmp, "blip", "sip"))


def exit_code(argv: Sequence[str]) -> int:
    """main's return value, or the code of the SystemExit argparse raises."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code)


def replace(args: list[str], option: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(option) + 1] = value
    return args


def without(args: list[str], option: str) -> list[str]:
    start = args.index(option)
    return args[:start] + args[start + 2 :]


@pytest.mark.parametrize(
    "case, words",
    [
        ("unknown_model_type", ["'bert'", "supported model types", "llava"]),
        ("model_not_found", ["does not exist", "/no/such/model"]),
        ("image_unreadable", ["not_an_image.png", "cannot decode image"]),
        ("image_missing", ["missing.png", "cannot decode image"]),
        ("same_first_token", ["'crimson'", "'scarlet'", "same first token", "'<unk>'"]),
        ("token_length", ["16 tokens", "18", "same token length"]),
        ("image_size", ["46 tokens", "54", "image of another size"]),
        ("no_corruption", ["one of the arguments", "--corrupt-image", "--noise"]),
        ("two_corruptions", ["--noise", "not allowed with", "--corrupt-image"]),
        ("template_without_question", ["--prompt-template", "{question}"]),
        ("audit_in_float32", ["--audit needs --dtype bfloat16 or float16", "a float32 run"]),
        ("audit_in_float64", ["--audit needs --dtype bfloat16 or float16", "a float64 run"]),
        ("audit_negative", ["--audit -1", "cannot be negative"]),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    tmp: Path, case: str, words: list[str], capsys: pytest.CaptureFixture
) -> None:
    args = cli_args(tmp, "llava", "sip", tmp / f"bad_{case}.parquet")
    wide = cli_args(tmp, "llava_next", "sip", tmp / f"bad_{case}.parquet")
    argv = {
        "unknown_model_type": replace(args, "--model", str(tmp / "bert")),
        "model_not_found": replace(args, "--model", "/no/such/model"),
        "image_unreadable": replace(args, "--image", str(tmp / "not_an_image.png")),
        "image_missing": replace(args, "--corrupt-image", str(tmp / "missing.png")),
        "same_first_token": replace(replace(args, "--answer", "crimson"), "--distractor", "scarlet"),
        "token_length": without(args, "--corrupt-image") + ["--corrupt-question", "is the object blue?"],
        "image_size": replace(wide, "--corrupt-image", str(tmp / "clean.png")),
        "no_corruption": without(args, "--corrupt-image"),
        "two_corruptions": args + ["--noise", "gn_mult"],
        "template_without_question": args + ["--prompt-template", "USER: <image>\nASSISTANT:"],
        "audit_in_float32": args + ["--audit", "8"],
        "audit_in_float64": args + ["--dtype", "float64", "--audit", "8"],
        "audit_negative": args + ["--dtype", "bfloat16", "--audit", "-1"],
    }[case]
    capsys.readouterr()
    assert exit_code(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert all(word in lines[0] for word in words), lines[0]
    assert not (tmp / f"bad_{case}.parquet").exists() and not (tmp / f"bad_{case}.precision.csv").exists()
