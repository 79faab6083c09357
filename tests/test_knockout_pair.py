"""`python -m notice knockout-pair` on tiny local models of every family (opt-in streams through `--adapter`).

The CLI's table must be what notice.flow gives in-process for the same image and question, the default edges a
family has no tokens for (or refuses) are noted and left out, and bad input must be one line on stderr with exit
code 2.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from toy_adapters import QUESTION, knockout_refusal, one_torch_thread, save_tiny_models, tiny_adapter

from notice.__main__ import main
from notice.adapters.loading import load_adapter
from notice.families import family, family_names
from notice.files.tables import read_table
from notice.flow.groups import token_groups
from notice.flow.knockout import DEFAULT_EDGES, KNOCKOUT_COLUMNS, default_window, edges_without_rows, knockout_rows
from notice.workflow.runtime import load_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny model directories of every family (its tiny builder), a wide random image and an object mask."""
    root = tmp_path_factory.mktemp("knockout_pair")
    save_tiny_models(root, family_names())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(root / "wide.png")
    mask = np.zeros((24, 40), dtype=np.uint8)
    mask[:12, :20] = 255
    Image.fromarray(mask).save(root / "mask.png")
    (root / "not_an_image.png").write_text("not an image")
    return root


def cli_args(tmp: Path, name: str, out: Path, *extra: str) -> list[str]:
    adapter = ["--adapter", name] if family(name).opt_in else []
    return [
        "knockout-pair",
        "--model",
        str(tmp / name),
        "--image",
        str(tmp / "wide.png"),
        "--object-mask",
        str(tmp / "mask.png"),
        "--question",
        QUESTION,
        "--answer",
        "red",
        "--distractor",
        "green",
        "--out",
        str(out),
        *adapter,
        *extra,
    ]


def expected_rows(tmp: Path, name: str) -> tuple[pd.DataFrame, dict]:
    """notice.flow's rows for the CLI's defaults, in-process, and why the edges without rows have none."""
    adapter = load_adapter(str(tmp / name), adapter=name if family(name).opt_in else None)
    inp = adapter.prepare(load_image(str(tmp / "wide.png")), adapter.format_prompt(QUESTION))
    groups = token_groups(adapter, inp, QUESTION, adapter.mask_view(Image.open(tmp / "mask.png"), inp))
    edges = [tuple(e.split(":")) for e in DEFAULT_EDGES]
    skipped = edges_without_rows(adapter, inp, groups, edges)
    tau, tau_p = adapter.option_token_id("red"), adapter.option_token_id("green")
    kept = [e for e in edges if e not in skipped]
    return knockout_rows(adapter, inp, tau, tau_p, groups, kept, default_window(adapter.n_layers)), skipped


@pytest.mark.parametrize("name", family_names())
def test_rows_are_the_librarys(tmp: Path, name: str, capsys: pytest.CaptureFixture) -> None:
    out = tmp / f"{name}.parquet"
    if refusal := knockout_refusal(tiny_adapter(name)):  # the adapter's reason stops the command
        with pytest.raises(NotImplementedError, match=re.escape(refusal)):
            main(cli_args(tmp, name, out))
        return
    assert main(cli_args(tmp, name, out)) == 0
    rows = read_table(out, KNOCKOUT_COLUMNS)
    expected, skipped = expected_rows(tmp, name)
    assert list(rows.columns) == list(KNOCKOUT_COLUMNS)
    pd.testing.assert_frame_equal(rows, expected, check_exact=False, rtol=1e-6, atol=1e-7)
    # A Q-Former stream has no question and no answer position: none of the default edges.
    assert len(rows) == (len(DEFAULT_EDGES) - len(skipped)) * (len(rows) and len(set(rows["layer_start"])))
    assert (len(rows) == 0) == (len(skipped) == len(DEFAULT_EDGES))
    printed = capsys.readouterr().out
    assert ("no knocked-out runs" if rows.empty else "knocked-out runs") in printed and str(out) in printed
    assert all(f"{s}:{t}: no rows ({reason})" in printed for (s, t), reason in skipped.items())


def test_edges_window_and_reference_engine(tmp: Path) -> None:
    out = tmp / "llava_reference.parquet"
    args = cli_args(tmp, "llava", out, "--edges", "image:last,question:last", "--window", "2", "--engine", "reference")
    assert main(args) == 0
    rows = read_table(out, KNOCKOUT_COLUMNS)
    assert list(zip(rows["source"], rows["target"], rows["layer_start"], rows["window"])) == [
        ("image", "last", 0, 2),
        ("question", "last", 0, 2),
    ]


def test_entry_point(tmp: Path) -> None:
    out = tmp / "out_subprocess.parquet"
    done = subprocess.run(
        [sys.executable, "-m", "notice", *cli_args(tmp, "llava", out)],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "knocked-out runs" in done.stdout and len(read_table(out, KNOCKOUT_COLUMNS)) > 0


def exit_code(argv: Sequence[str]) -> int:
    """main's return value, or the code of the SystemExit argparse raises."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code)


@pytest.mark.parametrize(
    "case, words",
    [
        ("bad_edge", ["--edges", "'image:answer'", "source:target"]),
        ("refused_edge", ["--edges image:question", "every cross-attention key", "softmax of nothing"]),
        ("window", ["--window 3", "2 layers"]),
        ("same_first_token", ["'crimson'", "'scarlet'", "same first token"]),
        ("image_unreadable", ["not_an_image.png", "cannot decode image"]),
        ("model_not_found", ["does not exist", "/no/such/model"]),
        ("template_without_question", ["--prompt-template", "{question}"]),
        ("batch_size", ["--batch-size 0"]),
        ("engine", ["--engine", "invalid choice", "'fastest'"]),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    tmp: Path, case: str, words: list[str], capsys: pytest.CaptureFixture
) -> None:
    out = tmp / f"bad_{case}.parquet"
    args = cli_args(tmp, "llava", out)
    argv = {
        "bad_edge": args + ["--edges", "image:last,image:answer"],
        "refused_edge": cli_args(tmp, "blip", out, "--edges", "object:question,image:question"),
        "window": args + ["--window", "3"],
        "same_first_token": args + ["--answer", "crimson", "--distractor", "scarlet"],
        "image_unreadable": args + ["--image", str(tmp / "not_an_image.png")],
        "model_not_found": args + ["--model", "/no/such/model"],
        "template_without_question": args + ["--prompt-template", "USER: <image>\nASSISTANT:"],
        "batch_size": args + ["--batch-size", "0"],
        "engine": args + ["--engine", "fastest"],
    }[case]
    capsys.readouterr()
    assert exit_code(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert all(word in lines[0] for word in words), lines[0]
    assert not out.exists()
