"""notice.workflow.config without Snakemake: schema errors named by key path and source, the schema's
defaults filled in (absent sections included), the checks the schema cannot make, and the library's
defaults for callers outside the workflow equal to the schema's (the downloader's: tests/test_download.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from workflow_helpers import REPO, SYNTHETIC_TASKS

from notice.workflow.config import (
    ConfigSources,
    blamed_source,
    checked_config,
    dataset_errors,
    flow_errors,
    model_errors,
    schema_errors,
    unavailable_models,
    with_defaults,
)

SCHEMA_PATH = REPO / "config" / "schemas" / "config.schema.yaml"
SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())
DEMO = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
QUESTION = "is it {a} or {b}?"


def minimal_config() -> dict[str, Any]:
    """Only the required keys: every section that has defaults is absent."""
    return {
        "seed": 0,
        "datasets": {"synthetic": {"kind": "synthetic", "n_scenes": 4, "tasks": copy.deepcopy(SYNTHETIC_TASKS)}},
        "models": {"toy": {"train": {"family": "blip", "dataset": "synthetic"}}},
        "corruptions": {"sip": {}},
        "selection": {"n_per_task": 1},
        "patching": {},
        "analysis": {},
    }


def from_file(config: dict, name: str = "my.yaml") -> ConfigSources:
    return ConfigSources(((name, config),), {})


def schema_default(*path: str) -> Any:
    """The schema's default at `path`: each name is looked up among the node's `properties`, else in the node
    itself (e.g. "definitions", "additionalProperties")."""
    node: dict = SCHEMA
    for key in path:
        node = node["properties"][key] if key in node.get("properties", {}) else node[key]
    return node["default"]


# -- schema errors: key path, expectation, source ----------------------------------------------------------
def test_an_unknown_key_is_named_by_its_path_with_the_keys_expected():
    config = minimal_config()
    config["patching"]["engnie"] = "fast"
    config["datasets"]["synthetic"]["tasks"]["colour"]["questoin"] = "q"
    assert schema_errors(config, SCHEMA, from_file(config)) == [
        "config error in my.yaml: datasets.synthetic.tasks.colour.questoin: unknown key (expected one of: "
        "question, values, groups, distractor_rule)",
        "config error in my.yaml: patching.engnie: unknown key (expected one of: engine, module_sites, head_sites, "
        "batch_size, precision_audit)",
    ]


def test_a_wrong_value_is_blamed_on_the_last_source_that_sets_it():
    first, second = minimal_config(), {"selection": {"n_per_task": "many"}}
    merged = copy.deepcopy(first)
    merged["selection"]["n_per_task"] = "many"
    sources = ConfigSources((("a.yaml", first), ("b.yaml", second)), {})
    assert schema_errors(merged, SCHEMA, sources) == [
        "config error in b.yaml: selection.n_per_task: 'many' is not of type 'integer'"
    ]
    sources = ConfigSources((("a.yaml", first), ("b.yaml", second)), {"selection": {"n_per_task": "many"}})
    assert schema_errors(merged, SCHEMA, sources) == [
        "config error in --config: selection.n_per_task: 'many' is not of type 'integer' (Snakemake reads nested "
        "--config values as strings: set this key in a --configfile)"
    ]


def test_a_missing_key_is_blamed_on_the_first_source_of_its_section():
    config = minimal_config()
    del config["analysis"]
    assert schema_errors(config, SCHEMA, from_file(config)) == [
        "config error in my.yaml: analysis: required key missing"
    ]
    overrides = {"datasets": {"extra": {"path": "x"}}}
    merged = copy.deepcopy(config) | {"analysis": {}}
    merged["datasets"]["extra"] = {"path": "x"}
    errors = schema_errors(merged, SCHEMA, ConfigSources((("my.yaml", config),), overrides))
    assert errors[:2] == [
        "config error in --config: datasets.extra.kind: required key missing",
        "config error in --config: datasets.extra.tasks: required key missing",
    ]


def test_a_key_set_nowhere_names_every_config_file():
    assert blamed_source(["x", "y"], False, ConfigSources((("a.yaml", {}), ("b.yaml", {})), {})) == "a.yaml, b.yaml"
    assert blamed_source(["x", "y"], True, ConfigSources((("a.yaml", {}), ("b.yaml", {"x": {}})), {})) == "b.yaml"


def test_a_model_with_both_path_and_train_names_the_one_of():
    config = minimal_config()
    config["models"]["toy"]["path"] = "somewhere"
    [line] = schema_errors(config, SCHEMA, from_file(config))
    assert line.startswith("config error in my.yaml: models.toy: expected exactly one of the schemas [")


def test_sources_are_read_from_files(tmp_path):
    (tmp_path / "a.yaml").write_text("seed: 3\n")
    sources = ConfigSources.read([tmp_path / "a.yaml"], {"seed": 4})
    assert sources.by_precedence() == [("--config", {"seed": 4}), (str(tmp_path / "a.yaml"), {"seed": 3})]


# -- defaults: the schema's, absent sections included -------------------------------------------------------
def test_absent_sections_get_the_schemas_defaults():
    filled = with_defaults(minimal_config(), SCHEMA)
    assert filled["results_dir"] == "results" and filled["resources_dir"] == "resources"
    assert filled["sharding"] == {"n_shards": 1}
    assert filled["gpu_jobs"] == {"threads": 2, "mem_mb": 16000, "runtime": 240}
    assert filled["patching"] == {
        "engine": "fast",
        "module_sites": True,
        "head_sites": True,
        "batch_size": 64,
        "precision_audit": {"rows": 256, "device": "auto"},
    }
    assert filled["screen"] == {"enabled": False, "method": "atp", "top_k": 10, "confirm_top": 0, "map_samples": 4}
    assert filled["flow"] == {
        "enabled": False,
        "window": None,
        "edges": ["image:question", "image:last", "question:last", "object:question", "object:last", "text:last"],
        "ablation_draws": 8,
        "lens_samples": 16,
        "engine": "fast",
        "batch_size": 64,
    }
    assert filled["circuits"] == {
        "enabled": False,
        "ig_steps": 5,
        "target_faithfulness": 0.8,
        "curve_points": 10,
        "validation_edges": 24,
        "validation_top_k": 5,
    }
    assert filled["selection"] == {"n_per_task": 1, "min_per_task": 1}
    assert filled["analysis"]["head_functions"]["outlier_z"] == 3.0 and filled["analysis"]["k_sigma"] == 2.0
    dataset = filled["datasets"]["synthetic"]
    assert dataset["distractors"] == {"vectors": "glove-6b-50d", "cosine_threshold": 0.8, "near_synonyms": []}
    assert dataset["image_size"] == 64 and dataset["tasks"]["colour"]["distractor_rule"] == "any"
    assert filled["models"]["toy"] | {"train": None} == {
        "train": None,
        "dtype": "float32",
        "device": "auto",
        "prompt_template": None,
        "max_new_tokens": 5,
    }


def test_the_downloader_and_the_inpainting_mask_get_their_defaults_where_they_apply():
    config = minimal_config()
    config["datasets"]["svo"] = {"kind": "svo_probes", "path": "x.csv", "tasks": {"svo_verb": {"question": QUESTION}}}
    config["corruptions"]["sd_inpaint"] = {}
    filled = with_defaults(config, SCHEMA)
    assert filled["datasets"]["svo"]["download"] == {
        "workers": 8,
        "timeout_s": 30,
        "retries": 2,
        "backoff_s": 1.0,
        "max_bytes": 33554432,
        "max_image_pixels": 50000000,
    }
    assert "download" not in filled["datasets"]["synthetic"]  # a key of kind svo_probes only
    assert filled["corruptions"]["sd_inpaint"]["mask"] == {"source": "box", "box": [0.25, 0.25, 0.75, 0.75]}
    assert filled["corruptions"]["sd_inpaint"]["model"] == "stabilityai/stable-diffusion-2-inpainting"
    config["datasets"]["svo"]["download"] = {"workers": 2}
    assert with_defaults(config, SCHEMA)["datasets"]["svo"]["download"]["workers"] == 2


def test_filling_copies_the_config_and_each_default():
    config = minimal_config()
    config["datasets"]["other"] = copy.deepcopy(config["datasets"]["synthetic"])
    before = copy.deepcopy(config)
    filled = with_defaults(config, SCHEMA)
    assert config == before
    filled["datasets"]["synthetic"]["distractors"]["near_synonyms"].append(["red", "blue"])
    assert filled["datasets"]["other"]["distractors"]["near_synonyms"] == []
    assert SCHEMA["definitions"]["distractors"]["properties"]["near_synonyms"]["default"] == []


def test_values_already_set_are_kept():
    filled = with_defaults(DEMO, SCHEMA)
    assert filled["gpu_jobs"]["threads"] == 1 and filled["screen"]["confirm_top"] == 10
    assert filled["datasets"]["synthetic"]["distractors"]["cosine_threshold"] == 0.88


def defaults_missing(schema: dict, instance: Any, root: dict, path: str = "") -> list[str]:
    """Every property with a default that is absent from an object of `instance` the schema describes (the
    properties, additional properties, $ref and if/then of `schema`, followed where the instance has values)."""
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        schema = {**target, **{key: value for key, value in schema.items() if key != "$ref"}}
    if not isinstance(instance, dict):
        return []
    missing = []
    properties = schema.get("properties", {})
    for key, subschema in properties.items():
        if "default" in subschema and key not in instance:
            missing.append(f"{path}{key}")
        if key in instance:
            missing += defaults_missing(subschema, instance[key], root, f"{path}{key}.")
    if isinstance(schema.get("additionalProperties"), dict):
        for key in set(instance) - set(properties):
            missing += defaults_missing(schema["additionalProperties"], instance[key], root, f"{path}{key}.")
    for part in schema.get("allOf", []):
        if "if" in part and Draft202012Validator(part["if"]).is_valid(instance):
            missing += defaults_missing(part["then"], instance, root, path)
    return missing


def test_every_default_of_the_schema_is_filled_in_wherever_its_section_applies():
    config = minimal_config()
    config["datasets"] |= {
        "svo": {"kind": "svo_probes", "path": "x.csv", "tasks": {"svo_verb": {"question": QUESTION}}},
        "mine": {"kind": "samples_table", "path": "x", "tasks": {"t": {"question": QUESTION, "values": ["a", "b"]}}},
    }
    config["models"]["real"] = {"path": "org/model"}
    config["corruptions"] |= {"str": {}, "gn_mult": {}, "gn_add": {}, "sd_inpaint": {}}
    assert defaults_missing(SCHEMA, config, SCHEMA)  # the walk sees the defaults of an unfilled config
    filled = with_defaults(config, SCHEMA)
    assert defaults_missing(SCHEMA, filled, SCHEMA) == []
    assert list(Draft202012Validator(SCHEMA).iter_errors(filled)) == []


# -- what the schema cannot say -------------------------------------------------------------------------
def filled(config: dict) -> dict:
    return with_defaults(config, SCHEMA)


def test_a_dataset_key_of_another_kind_is_named():
    config = minimal_config()
    config["datasets"]["synthetic"]["exclude_words"] = ["person"]
    assert dataset_errors(filled(config)) == [
        "config: datasets.synthetic.exclude_words is only for kind svo_probes, not 'synthetic'"
    ]


def test_unknown_corruptions_and_sd_inpaint_outside_svo_probes_are_named():
    config = minimal_config()
    config["datasets"]["synthetic"]["corruptions"] = ["sip", "gaussian"]
    assert dataset_errors(filled(config)) == [
        "config: datasets.synthetic.corruptions has 'gaussian', which is not in the top-level corruptions "
        "section (expected one of ['sip'])"
    ]
    config["corruptions"]["sd_inpaint"] = {}
    config["datasets"]["synthetic"]["corruptions"] = ["sd_inpaint"]
    assert dataset_errors(filled(config)) == [
        "config: datasets.synthetic.corruptions has 'sd_inpaint', which needs SVO-Probes triplets (kind "
        "svo_probes), not kind 'synthetic'; list the dataset's corruptions without it"
    ]


def test_flow_edges_name_each_bad_edge_by_its_index():
    config = minimal_config()
    config["flow"] = {"edges": ["image:last", "imgae:last", "image-last", "image:last:text", "image:last"]}
    expected = "expected source:target, each one of image, object, question, last, text"
    assert flow_errors(filled(config)) == [
        f"config: flow.edges.1 = 'imgae:last': unknown group 'imgae' ({expected})",
        f"config: flow.edges.2 = 'image-last' is not one source:target pair ({expected})",
        f"config: flow.edges.3 = 'image:last:text' is not one source:target pair ({expected})",
        "config: flow.edges.4 = 'image:last' is listed twice",
    ]
    assert flow_errors(filled(minimal_config())) == []  # the default edges


def test_flow_settings_out_of_range_are_schema_errors():
    config = minimal_config()
    config["flow"] = {"window": 0, "engine": "slow", "ablation_draws": 0, "edges": [], "lens_samples": "all"}
    assert schema_errors(config, SCHEMA, from_file(config)) == [
        "config error in my.yaml: flow.window: 0 is less than the minimum of 1",
        "config error in my.yaml: flow.edges: [] should be non-empty",
        "config error in my.yaml: flow.ablation_draws: 0 is less than the minimum of 1",
        "config error in my.yaml: flow.lens_samples: 'all' is not of type 'integer', 'null'",
        "config error in my.yaml: flow.engine: 'slow' is not one of ['fast', 'reference']",
    ]
    config["flow"] = {"window": None, "lens_samples": None}
    assert schema_errors(config, SCHEMA, from_file(config)) == []


def real_dataset(kind: str, path: Path | None) -> dict:
    tasks = {"t": {"question": QUESTION, "values": ["a", "b"]}}
    return {"kind": kind, "tasks": tasks} | ({} if path is None else {"path": str(path)})


@pytest.mark.parametrize(
    "kind, layout, expected",
    [
        ("samples_table", None, "config: datasets.d.path is required for kind 'samples_table' (a directory"),
        ("samples_table", ["samples.parquet"], "/src': image_pool.parquet not found there (expected a directory"),
        ("svo_probes", [], "/src' does not exist (kind svo_probes: expected the SVO-Probes CSV file"),
        ("svo_probes", ["./"], "/src' is not a file (kind svo_probes"),
        ("mit_states", ["adj noun/a.jpg"], "/src' has no images/ folder (kind mit_states"),
        ("facial_expressions", [], "/src' does not exist (kind facial_expressions"),
    ],
)
def test_a_missing_or_wrong_dataset_path_is_named(tmp_path, kind, layout, expected):
    source = tmp_path / "src"
    for name in layout or []:  # files, and folders where the name ends in "/"
        target = source / name.rstrip("/")
        (target if name.endswith("/") else target.parent).mkdir(parents=True, exist_ok=True)
        if not name.endswith("/"):
            target.write_bytes(b"")
    config = minimal_config()
    config["datasets"]["d"] = real_dataset(kind, None if layout is None else source)
    [line] = dataset_errors(filled(config))
    assert expected in line and line.startswith("config: datasets.d.path"), line


@pytest.mark.parametrize(
    "kind, layout",
    [
        ("samples_table", ["samples.parquet", "image_pool.parquet"]),
        ("mit_states", ["images/old car/a.jpg"]),
        ("facial_expressions", ["train/happy/a.jpg"]),
    ],
)
def test_a_dataset_path_with_its_layout_passes(tmp_path, kind, layout):
    for name in layout:
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(b"")
    config = minimal_config()
    config["datasets"]["d"] = real_dataset(kind, tmp_path / "src")
    assert dataset_errors(filled(config)) == []


def test_a_synthetic_dataset_asks_its_generators_tasks_and_values():
    config = minimal_config()
    section = config["datasets"]["synthetic"]
    del section["n_scenes"]
    section["tasks"]["size"] = {"question": QUESTION, "values": ["big", "small"]}
    section["tasks"]["shape"]["values"] = ["circle", "hexagon"]
    section["tasks"]["colour"]["values"] = ["red", "red"]
    assert dataset_errors(filled(config)) == [
        "config: datasets.synthetic.n_scenes is required for a synthetic dataset",
        "config: datasets.synthetic.tasks.colour.values: ['red', 'red'] has fewer than two different values "
        "(the distractor is another value of the task)",
        "config: datasets.synthetic.tasks.shape.values: ['hexagon'] not known to the synthetic generator, which "
        "renders ['circle', 'square', 'triangle', 'cross'] (any two or more of them)",
        "config: datasets.synthetic.tasks.size: the synthetic generator has no task 'size'; it asks "
        "['colour', 'shape']",
    ]


def test_a_task_of_any_kind_needs_two_different_values(tmp_path):
    (tmp_path / "samples.parquet").write_bytes(b"")
    (tmp_path / "image_pool.parquet").write_bytes(b"")
    config = minimal_config()
    config["datasets"]["d"] = real_dataset("samples_table", tmp_path)
    config["datasets"]["d"]["tasks"]["t"]["values"] = ["a", "a"]
    assert dataset_errors(filled(config)) == [
        "config: datasets.d.tasks.t.values: ['a', 'a'] has fewer than two different values (the distractor is "
        "another value of the task)"
    ]


def test_a_subset_of_the_synthetic_tasks_and_values_passes():
    config = minimal_config()
    config["datasets"]["synthetic"]["tasks"] = {"shape": {"question": QUESTION, "values": ["triangle", "circle"]}}
    assert dataset_errors(filled(config)) == []


def test_a_toy_models_dataset_and_architecture_are_checked():
    config = minimal_config()
    config["models"]["toy"]["train"]["dataset"] = "nowhere"
    config["models"]["toy_llava"] = {
        "train": {"family": "llava", "dataset": "synthetic", "text_heads": 8, "text_kv_heads": 3}
    }
    [missing, architecture] = model_errors(filled(config))
    assert missing == "config: models.toy.train.dataset = 'nowhere' is not a dataset (expected one of ['synthetic'])"
    assert architecture.startswith("config: models.toy_llava.train: ") and "text_kv_heads=3 must divide" in architecture


def test_a_model_that_is_not_on_disk_or_in_the_cache_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    config = minimal_config()
    config["models"] |= {"local": {"path": str(tmp_path / "nothing")}, "hub": {"path": "org/not-cached"}}
    online = unavailable_models(filled(config), offline=False)  # online, a hub id may still be downloaded
    assert len(online) == 1 and online[0].startswith(f"config: models.local.path: model directory '{tmp_path}")
    offline = unavailable_models(filled(config), offline=True)
    assert len(offline) == 2 and offline[0].startswith("config: models.local.path: ")
    assert offline[1].startswith("config: models.hub.path: model 'org/not-cached' is not in the local Hugging Face")
    (tmp_path / "nothing").mkdir()
    assert unavailable_models(filled(config), offline=False) == []


def test_an_inpainting_model_is_checked_only_when_a_dataset_uses_it(tmp_path):
    config = minimal_config()
    config["corruptions"]["sd_inpaint"] = {"model": str(tmp_path / "sd")}
    config["datasets"]["synthetic"]["corruptions"] = ["sip"]
    assert unavailable_models(filled(config), offline=False) == []
    config["datasets"]["svo"] = {"kind": "svo_probes", "path": "x.csv", "tasks": {"svo_verb": {"question": QUESTION}}}
    [line] = unavailable_models(filled(config), offline=False)
    assert line.startswith("config: corruptions.sd_inpaint.model (used by datasets ['svo']): inpainting model")


def test_checked_config_stops_at_schema_errors_then_checks_the_filled_config(tmp_path):
    config = minimal_config()
    assert checked_config(config, SCHEMA_PATH, from_file(config), offline=False) == with_defaults(config, SCHEMA)
    config["seed"] = "x"
    with pytest.raises(ValueError, match=r"^config error in my.yaml: seed: 'x' is not of type 'integer'$"):
        checked_config(config, SCHEMA_PATH, from_file(config), offline=False)
    config["seed"] = 0
    config["models"]["toy"]["train"]["dataset"] = "nowhere"
    config["datasets"]["synthetic"]["tasks"]["shape"]["values"] = ["circle"] * 2
    config["flow"] = {"edges": ["image:answer"]}
    with pytest.raises(ValueError) as stopped:
        checked_config(config, SCHEMA_PATH, from_file(config), offline=False)
    assert str(stopped.value).splitlines() == [
        "config: models.toy.train.dataset = 'nowhere' is not a dataset (expected one of ['synthetic'])",
        "config: datasets.synthetic.tasks.shape.values: ['circle', 'circle'] has fewer than two different values "
        "(the distractor is another value of the task)",
        "config: flow.edges.0 = 'image:answer': unknown group 'answer' (expected source:target, each one of image, "
        "object, question, last, text)",
    ]


# -- one default each for callers outside the workflow, equal to the schema's -----------------------------
def test_library_defaults_are_the_schemas():
    from notice import patch_pair
    from notice.data import inpainting, synthetic
    from notice.method import evaluate, heads
    from notice.method.head_functions import HeadFunctionConfig
    from notice.patching import fast

    assert fast.DEFAULT_BATCH_ROWS == schema_default("patching", "batch_size")
    assert patch_pair.DEFAULT_ENGINE == schema_default("patching", "engine")
    assert patch_pair.PATCH_SET == {key: schema_default("patching", key) for key in patch_pair.PATCH_SET}
    assert patch_pair.DEFAULT_NU == schema_default("corruptions", "gn_mult", "nu")
    assert patch_pair.DEFAULT_SIGMA_MULTIPLIER == schema_default("corruptions", "gn_add", "sigma_multiplier")
    assert heads.DEFAULT_METRIC == schema_default("analysis", "metric")
    assert heads.DEFAULT_K_SIGMA == schema_default("analysis", "k_sigma")
    assert list(heads.DEFAULT_UNIVERSAL_CORRUPTIONS) == schema_default("analysis", "universal_corruptions")
    assert evaluate.DEFAULT_MAX_NEW_TOKENS == schema_default("models", "additionalProperties", "max_new_tokens")
    assert synthetic.IMAGE_SIZE == schema_default("datasets", "additionalProperties", "image_size")
    thresholds = SCHEMA["properties"]["analysis"]["properties"]["head_functions"]["properties"]
    assert HeadFunctionConfig() == HeadFunctionConfig(**{key: spec["default"] for key, spec in thresholds.items()})
    inpaint = ("corruptions", "sd_inpaint")
    defaults = inpainting.InpaintSettings()
    assert (defaults.steps, defaults.guidance, defaults.size, defaults.prompt_template) == tuple(
        schema_default(*inpaint, key) for key in ("steps", "guidance", "size", "prompt_template")
    )
    assert inpainting.DEFAULT_MODEL == schema_default(*inpaint, "model")
    assert inpainting.MaskSpec().source == schema_default(*inpaint, "mask", "source")
    assert list(inpainting.MaskSpec().box) == schema_default(*inpaint, "mask", "box")
