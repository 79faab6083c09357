"""The flow stage's loop over selected samples (notice.flow.experiment) on tiny models, and the workflow's side of
the contract with the flow library: its groups, default edges, columns and defaults."""

import inspect

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from planted_tables import ABLATION_TABLE_COLUMNS, KNOCKOUT_TABLE_COLUMNS, LOGIT_LENS_TABLE_COLUMNS
from toy_adapters import QUESTION, noise_image, one_torch_thread, tiny_adapter
from workflow_helpers import REPO

from notice.files.tables import PROMPT_COLUMNS
from notice.flow import ablation, groups, knockout, logit_lens
from notice.flow.experiment import FlowSettings, flow_tables, knockout_window
from notice.flow.records import LABEL_COLUMNS, SKIPPED_COLUMNS
from notice.workflow.config import FLOW_GROUPS
from notice.workflow.runtime import load_image

SCHEMA = yaml.safe_load((REPO / "config" / "schemas" / "config.schema.yaml").read_text())
FLOW_SCHEMA = SCHEMA["properties"]["flow"]["properties"]


def test_the_config_knows_the_librarys_groups_edges_and_defaults():
    assert FLOW_GROUPS == groups.GROUPS
    assert FLOW_SCHEMA["edges"]["default"] == list(knockout.DEFAULT_EDGES)
    defaults = inspect.signature(knockout.knockout_rows).parameters
    assert defaults["engine"].default == FLOW_SCHEMA["engine"]["default"]
    assert defaults["batch_size"].default == FLOW_SCHEMA["batch_size"]["default"]
    assert knockout.parse_edges(FLOW_SCHEMA["edges"]["default"]) == tuple(
        tuple(edge.split(":")) for edge in knockout.DEFAULT_EDGES
    )


def test_the_planted_tables_have_the_librarys_columns():
    assert KNOCKOUT_TABLE_COLUMNS == (*LABEL_COLUMNS, *knockout.KNOCKOUT_COLUMNS)
    assert LOGIT_LENS_TABLE_COLUMNS == (*LABEL_COLUMNS, *logit_lens.LOGIT_LENS_COLUMNS)
    assert ABLATION_TABLE_COLUMNS == (*LABEL_COLUMNS, *ablation.ABLATION_COLUMNS)


# s0, s1: colour with the object's mask (the top-left quarter); s2: shape without a mask; s3: a two-word subject.
SAMPLES = [("s0", "colour", True, "object"), ("s1", "colour", True, "object"), ("s2", "shape", False, "object")]
SAMPLES.append(("s3", "shape", True, "red car"))


def samples_table(adapter, tmp_path) -> pd.DataFrame:
    mask = np.zeros((32, 32), np.uint8)
    mask[:16, :16] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    rows = []
    for i, (sample_id, task, has_mask, subject) in enumerate(SAMPLES):
        noise_image(i).save(tmp_path / f"{sample_id}.png")
        rows.append(
            {
                "sample_id": sample_id,
                "task": task,
                "category": "red",
                "image_path": str(tmp_path / f"{sample_id}.png"),
                "mask_path": str(tmp_path / "mask.png") if has_mask else "",
                "answer": "red",
                "distractor": "green",
                "correct_first": True,
                "question": QUESTION,
                "prompt": adapter.format_prompt(QUESTION),
                "answer_token_id": adapter.option_token_id("red"),
                "distractor_token_id": adapter.option_token_id("green"),
                "subject": subject,
            }
        )
    return pd.DataFrame(rows, columns=[*PROMPT_COLUMNS, "subject"])


@pytest.fixture(scope="module", params=["llava", "blip"])
def flow_run(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(request.param)
    with one_torch_thread():
        adapter = tiny_adapter(request.param)
        samples = samples_table(adapter, tmp_path)
        settings = FlowSettings(
            edges=knockout.parse_edges(list(knockout.DEFAULT_EDGES)),
            window=None,
            ablation_draws=2,
            engine="fast",
            batch_size=64,
            seed=0,
        )
        tables = flow_tables(
            adapter, samples, load_image, settings, {"s0", "s2", "s3"}, labels={"model": "m", "dataset": "d"}
        )
    return adapter, samples, settings, tables


def test_every_usable_edge_has_a_row_per_window_start_and_the_rest_is_skipped(flow_run):
    adapter, samples, settings, tables = flow_run
    window = knockout.default_window(adapter.n_layers)
    assert list(tables.knockout.columns) == [*LABEL_COLUMNS, *knockout.KNOCKOUT_COLUMNS]
    assert set(tables.knockout["window"]) == {window}
    assert set(tables.knockout[["model", "dataset"]].itertuples(index=False, name=None)) == {("m", "d")}
    for sample in samples.itertuples(index=False):
        rows = tables.knockout[tables.knockout["sample_id"] == sample.sample_id]
        skipped = tables.skipped[
            (tables.skipped["sample_id"] == sample.sample_id) & (tables.skipped["analysis"] == "knockout")
        ]
        computed = set(rows["source"] + ":" + rows["target"])
        assert computed.isdisjoint(skipped["item"])
        assert computed | set(skipped["item"]) == set(knockout.DEFAULT_EDGES)  # nothing dropped silently
        assert len(rows) == len(computed) * (adapter.n_layers - window + 1)
        assert set(rows["task"]) <= {sample.task}
    no_mask = tables.skipped[tables.skipped["sample_id"] == "s2"]
    assert {"object:question", "object:last", "object"} <= set(no_mask["item"])
    assert set(no_mask.loc[no_mask["item"].str.startswith("object"), "reason"]) == {"no object mask"}


def test_ablation_on_masked_samples_and_the_lens_on_the_chosen_ones(flow_run):
    _, _, settings, tables = flow_run
    assert list(tables.ablation.columns) == [*LABEL_COLUMNS, *ablation.ABLATION_COLUMNS]
    assert "s2" not in set(tables.ablation["sample_id"])
    masked = tables.ablation[tables.ablation["sample_id"] == "s0"]
    assert (masked["ablated"] == "object").sum() == 1
    assert sorted(masked.loc[masked["ablated"] == "random", "draw"]) == list(range(settings.ablation_draws))
    assert list(tables.logit_lens.columns) == [*LABEL_COLUMNS, *logit_lens.LOGIT_LENS_COLUMNS]
    lens_skips = tables.skipped[tables.skipped["analysis"] == "logit_lens"]
    if len(tables.logit_lens):  # a family whose image positions the lens reads
        assert set(tables.logit_lens["sample_id"]) == {"s0", "s2", "s3"}
        assert tables.logit_lens.loc[tables.logit_lens["sample_id"] == "s3", "object_in_top5"].isna().all()
        assert tables.logit_lens.loc[tables.logit_lens["sample_id"] == "s0", "object_in_top5"].notna().all()
        assert lens_skips[["sample_id", "item"]].values.tolist() == [["s3", "object_in_top5"]]
    else:  # the image enters by cross-attention: refused, with the adapter's reason
        assert lens_skips[["sample_id", "item"]].values.tolist() == [["s0", "image"], ["s2", "image"], ["s3", "image"]]
        assert lens_skips["reason"].str.contains("cross-attention").all()
    assert list(tables.skipped.columns) == list(SKIPPED_COLUMNS)


def test_a_window_longer_than_the_model_is_refused(flow_run):
    adapter = flow_run[0]
    assert knockout_window(adapter, adapter.n_layers) == adapter.n_layers
    with pytest.raises(ValueError, match=rf"flow.window = {adapter.n_layers + 1} is more than"):
        knockout_window(adapter, adapter.n_layers + 1)
