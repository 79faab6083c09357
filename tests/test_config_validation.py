"""Bad configs stop the run at start with a message naming the key and what was expected."""

import copy

import pytest
import yaml
from workflow_helpers import REPO, snakemake, write_config

DEMO = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
SCHEMA = yaml.safe_load((REPO / "config" / "schemas" / "config.schema.yaml").read_text())


def dry_run(tmp_path, config=None, *args):
    """(return code, everything Snakemake printed) for `config` as --configfile (None: the demo) and `args`."""
    configfile = None if config is None else write_config(tmp_path / "config.yaml", config)
    result = snakemake(tmp_path, "-n", *args, configfile=configfile, timeout=120)
    return result.returncode, result.stdout + result.stderr


def assert_config_error(output, *lines):
    """The run stopped in a few lines of output, each of `lines` among them."""
    assert len(output.strip().splitlines()) <= 12, output
    for line in lines:
        assert line in output.splitlines(), output


def test_demo_config_plans(tmp_path):
    code, output = dry_run(tmp_path, DEMO)
    assert code == 0, output
    for rule in (
        "synthetic_dataset",
        "train_toy_model",
        "distractors",
        "prompts",
        "evaluate_shard",
        "gather_answers",
        "select_samples",
        "pairs",
        "cache_clean",
        "patch",
        "gather_patching",
        "analyse_heads",
        "figures",
        "report",
    ):
        assert rule in output, f"rule {rule} missing from the plan"


def test_config_overrides_go_on_top_of_the_demo(tmp_path):
    code, output = dry_run(tmp_path, None, "--config", "seed=1")
    assert code == 0, output
    assert "train_toy_model" in output and "toy_llava" in output
    # A nested mapping is merged into the demo's: without the merge this dataset would lack kind and tasks.
    code, output = dry_run(tmp_path, None, "--config", "datasets={synthetic: {subject: thing}}")
    assert code == 0, output
    code, output = dry_run(tmp_path, None, "--config", "patching={engine: slow}")
    assert code != 0
    assert_config_error(output, "config error in --config: patching.engine: 'slow' is not one of ['reference', 'fast']")


def test_a_config_file_replaces_the_demo_and_overrides_go_on_top(tmp_path):
    config = copy.deepcopy(DEMO)
    del config["models"]["toy_llava"], config["analysis"]
    code, output = dry_run(tmp_path, config)
    assert code != 0
    assert_config_error(output, f"config error in {tmp_path / 'config.yaml'}: analysis: required key missing")
    code, output = dry_run(tmp_path, config, "--config", "analysis={metric: logit_diff}")
    assert code == 0, output
    assert "toy_blip" in output and "toy_llava" not in output


def test_unknown_key_is_named(tmp_path):
    config = copy.deepcopy(DEMO)
    config["patching"]["engnie"] = "fast"
    config["sed"] = 1
    code, output = dry_run(tmp_path, config)
    assert code != 0
    where = f"config error in {tmp_path / 'config.yaml'}"
    assert_config_error(
        output,
        f"{where}: sed: unknown key (expected one of: {', '.join(SCHEMA['properties'])})",
        f"{where}: patching.engnie: unknown key (expected one of: "
        f"{', '.join(SCHEMA['properties']['patching']['properties'])})",
    )


def test_unknown_nested_key_is_named_with_its_path(tmp_path):
    config = copy.deepcopy(DEMO)
    config["datasets"]["synthetic"]["tasks"]["colour"]["questoin"] = "what?"
    code, output = dry_run(tmp_path, config)
    assert code != 0
    assert_config_error(
        output,
        f"config error in {tmp_path / 'config.yaml'}: datasets.synthetic.tasks.colour.questoin: "
        "unknown key (expected one of: question, values, groups, distractor_rule)",
    )
    code, output = dry_run(tmp_path, None, "--config", "datasets={synthetic: {tasks: {colour: {questoin: what}}}}")
    assert code != 0
    assert "config error in --config: datasets.synthetic.tasks.colour.questoin: unknown key" in output


def test_wrong_type_is_named(tmp_path):
    config = copy.deepcopy(DEMO)
    config["selection"]["n_per_task"] = "many"
    code, output = dry_run(tmp_path, config)
    assert code != 0
    assert_config_error(
        output, f"config error in {tmp_path / 'config.yaml'}: selection.n_per_task: 'many' is not of type 'integer'"
    )
    code, output = dry_run(tmp_path, None, "--config", "seed=x")
    assert code != 0
    assert_config_error(output, "config error in --config: seed: 'x' is not of type 'integer'")


def test_missing_required_key_is_blamed_on_the_source_of_its_section(tmp_path):
    code, output = dry_run(tmp_path, None, "--config", "datasets={extra: {path: x}}")
    assert code != 0
    assert_config_error(
        output,
        "config error in --config: datasets.extra.kind: required key missing",
        "config error in --config: datasets.extra.tasks: required key missing",
    )
    config = copy.deepcopy(DEMO)
    del config["datasets"]["synthetic"]["tasks"]["colour"]["values"]
    code, output = dry_run(tmp_path, config, "--config", "datasets={synthetic: {tasks: {colour: {question: q}}}}")
    assert code != 0
    assert_config_error(
        output,
        f"config error in {tmp_path / 'config.yaml'}: datasets.synthetic.tasks.colour.values: required key missing",
    )


def test_missing_dataset_path_is_named(tmp_path):
    config = copy.deepcopy(DEMO)
    config["datasets"]["mine"] = {
        "kind": "samples_table",
        "path": str(tmp_path / "nowhere"),
        "tasks": {"colour": {"question": "is it {a} or {b}?", "values": ["red", "blue"]}},
    }
    code, output = dry_run(tmp_path, config)
    assert code != 0
    assert "datasets.mine.path" in output and "samples.parquet not found" in output


def test_missing_model_is_named(tmp_path):
    config = copy.deepcopy(DEMO)
    config["models"]["real_blip"] = {"path": "Salesforce/blip-vqa-base-not-cached"}
    code, output = dry_run(tmp_path, config)
    assert code != 0
    assert "models.real_blip.path" in output and "HF_HOME" in output


@pytest.mark.parametrize("corruption", ["gaussian"])
def test_unknown_corruption_is_named(tmp_path, corruption):
    config = copy.deepcopy(DEMO)
    config["corruptions"][corruption] = {}
    code, output = dry_run(tmp_path, config)
    assert code != 0
    assert corruption in output


def test_toy_architecture_that_does_not_fit_is_named(tmp_path):
    config = copy.deepcopy(DEMO)
    config["models"]["toy_llava"]["train"].update(text_heads=8, text_kv_heads=3)
    code, output = dry_run(tmp_path, config)
    assert code != 0
    assert "models.toy_llava.train" in output and "text_kv_heads=3 must divide text_heads=8" in output


def test_the_shipped_configs_validate_and_modern_models_merge_onto_the_paper_config():
    from snakemake.utils import update_config, validate

    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    update_config(paper, yaml.safe_load((REPO / "config" / "modern_models.yaml").read_text()))
    validate(paper, str(REPO / "config" / "schemas" / "config.schema.yaml"))
    assert {"blip", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl"} <= set(paper["models"])
    for name in ("llava_next", "qwen2_vl", "qwen2_5_vl"):
        assert paper["models"][name]["prompt_template"].count("{question}") == 1


@pytest.mark.parametrize("name", sorted(yaml.safe_load((REPO / "config" / "models_2026.yaml").read_text())["models"]))
def test_each_2026_prompt_template_takes_the_image_in_its_family_processor(name):
    """The 2026 config's templates hold the family's image placeholder: the family's processor (tiny, with the
    checkpoint's special tokens) takes the prompt with one image and expands the placeholder into image tokens."""
    from snakemake.utils import update_config, validate
    from toy_adapters import noise_image, tiny_adapter

    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    update_config(paper, yaml.safe_load((REPO / "config" / "models_2026.yaml").read_text()))
    validate(paper, str(REPO / "config" / "schemas" / "config.schema.yaml"))
    template = paper["models"][name]["prompt_template"]
    assert template.count("{question}") == 1
    adapter = tiny_adapter(name)  # the sections are named after their families
    inp = adapter.prepare(noise_image(0), template.replace("{question}", "what is here"))
    assert inp.input_ids.shape[0] == 1
    assert len(adapter.image_keys(inp)) > 0, f"{name}: no image tokens in the prompt"
