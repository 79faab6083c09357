"""The workflow's config, checked before any job starts.

First the schema (config/schemas/config.schema.yaml): one line per violation, naming the key's full path,
what was expected and the source that set it (a config file or --config). Then the schema's defaults are
filled in: the schema is the only place a default is written, so rules and scripts read `section[key]`.
Last, what the schema cannot say: names that must exist, keys of other dataset kinds, dataset paths on disk,
the synthetic generator's tasks and values, toy architectures, the flow stage's edges, models available
offline.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema import Draft202012Validator

OVERRIDES = "--config"  # the source name of Snakemake's --config key=value overrides

# -- dataset kinds: what each reads, and the keys only some kinds have ------------------------------
SOURCE_LAYOUTS = {
    "samples_table": "a directory with samples.parquet and image_pool.parquet",
    "svo_probes": "the SVO-Probes CSV file (svo_probes.csv)",
    "mit_states": "the MIT-States directory holding images/<adjective> <noun>/*.jpg",
    "facial_expressions": "the FER-2013 fer2013.csv file, or a directory holding <split>/<emotion>/*.jpg "
    "or images/<split>/<emotion>/*.jpg (icml_face_data.csv is read too)",
}
KIND_ONLY_KEYS = {
    "path": ("samples_table", "svo_probes", "mit_states", "facial_expressions"),
    "n_scenes": ("synthetic",),
    "exclude_words": ("svo_probes",),
    "download": ("svo_probes",),
    "max_rows": ("svo_probes",),
    "splits": ("facial_expressions",),
}
SAMPLES_TABLE_FILES = ("samples.parquet", "image_pool.parquet")


def load_yaml(path: str | Path) -> Any:
    return yaml.safe_load(Path(path).read_text())


@dataclass(frozen=True)
class ConfigSources:
    """What each source of the config sets: the config files in the order given, and the --config overrides."""

    files: tuple[tuple[str, Any], ...]
    overrides: Mapping[str, Any]

    @classmethod
    def read(cls, paths: Sequence[str | Path], overrides: Mapping[str, Any]) -> ConfigSources:
        return cls(tuple((str(path), load_yaml(path)) for path in paths), overrides)

    def by_precedence(self) -> list[tuple[str, Any]]:
        """(name, content) of every source, the one whose value wins first: --config, then the last file."""
        return [(OVERRIDES, self.overrides), *reversed(self.files)]

    def file_names(self) -> str:
        return ", ".join(name for name, _ in self.files)


def has_key(data: Any, path: Sequence[str | int]) -> bool:
    """Whether the nested `data` has a value at the key path `path`."""
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return False
    return True


def violations(error: jsonschema.ValidationError) -> list[tuple[list[str | int], str]]:
    """(key path, what was expected) of each problem of one schema error: an unknown key or a missing required
    key is named by its own path, not by the path of the mapping that holds it."""
    path, known = list(error.absolute_path), error.schema.get("properties", {})
    if error.validator == "additionalProperties" and error.validator_value is False:
        return [
            (path + [key], f"unknown key (expected one of: {', '.join(known)})")
            for key in error.instance
            if key not in known
        ]
    if error.validator == "required":
        return [(path + [key], "required key missing") for key in error.validator_value if key not in error.instance]
    if error.validator in ("oneOf", "anyOf"):
        exactly = "exactly " if error.validator == "oneOf" else ""
        return [(path, f"expected {exactly}one of the schemas {error.validator_value}")]
    return [(path, error.message)]


def blamed_source(key_path: Sequence[str | int], missing: bool, sources: ConfigSources) -> str:
    """The source to name for a problem at `key_path`: for a missing key (set nowhere), the first source of the
    mapping that lacks it; otherwise the last source that sets it; the config files when none does."""
    ordered = sources.by_precedence()
    if missing:
        where = [name for name, data in reversed(ordered) if has_key(data, key_path[:-1])]
    else:
        where = [name for name, data in ordered if has_key(data, key_path)]
    return (where or [sources.file_names()])[0]


def schema_errors(config: Mapping[str, Any], schema: Mapping[str, Any], sources: ConfigSources) -> list[str]:
    """One line per schema violation of `config` (the merged config): where it was set, key path, expectation."""
    lines: dict[str, None] = {}  # ordered and without repeats (two subschemas may find the same problem)
    for error in Draft202012Validator(schema).iter_errors(config):
        for key_path, what in violations(error):
            source = blamed_source(key_path, error.validator == "required", sources)
            if source == OVERRIDES and len(key_path) > 1 and error.validator == "type":
                what += " (Snakemake reads nested --config values as strings: set this key in a --configfile)"
            lines[f"config error in {source}: {'.'.join(map(str, key_path))}: {what}"] = None
    return list(lines)


def _fill_defaults(validator: Any, properties: Mapping, instance: Any, schema: Mapping) -> Iterator:
    """jsonschema's `properties` keyword that first sets every absent property that has a default (a copy of
    it, so that no two sections share one object): an absent section with `default: {}` is inserted, then
    its own properties' defaults are filled in as the validator descends into it."""
    if validator.is_type(instance, "object"):
        for key, subschema in properties.items():
            if "default" in subschema and key not in instance:
                instance[key] = copy.deepcopy(subschema["default"])
    yield from Draft202012Validator.VALIDATORS["properties"](validator, properties, instance, schema)


DefaultFillingValidator = jsonschema.validators.extend(Draft202012Validator, {"properties": _fill_defaults})


def with_defaults(config: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `config` (valid against `schema`) with every default of the schema filled in."""
    filled = copy.deepcopy(dict(config))
    errors = [error.message for error in DefaultFillingValidator(schema).iter_errors(filled)]
    if errors:  # only a default that breaks its own schema gets here: the config was checked before
        raise ValueError(f"config schema: the config with its defaults does not validate: {errors}")
    return filled


def dataset_corruptions(config: Mapping[str, Any], dataset: str) -> list[str]:
    """The corruptions run on `dataset`: its own list, else every corruption of the config."""
    return list(config["datasets"][dataset].get("corruptions", sorted(config["corruptions"])))


def training_image_size(config: Mapping[str, Any], train: Mapping[str, Any]) -> int:
    """Image size of a toy model's training dataset (`train` is the model's `train` section)."""
    return int(config["datasets"][train["dataset"]]["image_size"])


def model_errors(config: Mapping[str, Any]) -> list[str]:
    """A toy model's training dataset must exist and its architecture must fit."""
    from notice.demo.toy_config import configs_from_settings  # lazy, as below: every job parses the Snakefile

    errors = []
    for name, section in config["models"].items():
        train = section.get("train")
        if not train:
            continue
        if train["dataset"] not in config["datasets"]:
            errors.append(
                f"config: models.{name}.train.dataset = {train['dataset']!r} is not a dataset "
                f"(expected one of {sorted(config['datasets'])})"
            )
            continue
        try:
            configs_from_settings(train, training_image_size(config, train))
        except ValueError as error:
            errors.append(f"config: models.{name}.train: {error}")
    return errors


def synthetic_errors(name: str, section: Mapping[str, Any]) -> list[str]:
    """The synthetic generator needs the number of scenes, and asks some of its own tasks, each with two or
    more of its own values (notice.data.synthetic.task_value_problems)."""
    from notice.data.synthetic import task_value_problems  # lazy: numpy, pandas, PIL only where needed

    errors = []
    if "n_scenes" not in section:
        errors.append(f"config: datasets.{name}.n_scenes is required for a synthetic dataset")
    task_values = {task: spec["values"] for task, spec in section["tasks"].items()}
    errors += [f"config: datasets.{name}.{where}: {what}" for where, what in task_value_problems(task_values)]
    return errors


def value_errors(name: str, section: Mapping[str, Any]) -> list[str]:
    """Each task's values hold two or more different words: the distractor is another value of the task (the
    schema counts the items, not the different ones; svo_probes tasks may have none: the rows give it)."""
    return [
        f"config: datasets.{name}.tasks.{task}.values: {list(spec['values'])} has fewer than two different values "
        "(the distractor is another value of the task)"
        for task, spec in section["tasks"].items()
        if "values" in spec and len(set(spec["values"])) < 2
    ]


def path_problem(kind: str, path: str) -> str | None:
    """What is wrong with a real dataset's `path` for its `kind`, or None."""
    if kind == "samples_table":
        for table in SAMPLES_TABLE_FILES:
            if not os.path.exists(os.path.join(path, table)):
                return f": {table} not found there (expected {SOURCE_LAYOUTS[kind]})"
        return None
    wanted_file = kind == "svo_probes" or (kind == "facial_expressions" and not os.path.isdir(path))
    if not os.path.exists(path):
        problem = "does not exist"
    elif wanted_file and not os.path.isfile(path):
        problem = "is not a file"
    elif kind == "mit_states" and not os.path.isdir(os.path.join(path, "images")):
        problem = "has no images/ folder"  # a FER directory may hold the split folders directly
    else:
        return None
    return f" {problem} (kind {kind}: expected {SOURCE_LAYOUTS[kind]}; see config/README.md, Real datasets)"


def dataset_errors(config: Mapping[str, Any]) -> list[str]:
    """Corruptions named by a dataset must exist; a dataset has only its kind's keys, and its source on disk."""
    corruptions = sorted(config["corruptions"])
    errors = []
    for name, section in config["datasets"].items():
        kind = section["kind"]
        for corruption in section.get("corruptions", []):
            if corruption not in config["corruptions"]:
                errors.append(
                    f"config: datasets.{name}.corruptions has {corruption!r}, which is not in the "
                    f"top-level corruptions section (expected one of {corruptions})"
                )
        for key in sorted(set(section) & set(KIND_ONLY_KEYS)):
            if kind not in KIND_ONLY_KEYS[key]:
                errors.append(
                    f"config: datasets.{name}.{key} is only for kind {' / '.join(KIND_ONLY_KEYS[key])}, not {kind!r}"
                )
        if "sd_inpaint" in dataset_corruptions(config, name) and kind != "svo_probes":
            errors.append(
                f"config: datasets.{name}.corruptions has 'sd_inpaint', which needs SVO-Probes triplets "
                f"(kind svo_probes), not kind {kind!r}; list the dataset's corruptions without it"
            )
        if kind == "synthetic":  # the generator's own checks, the number of values among them
            errors += synthetic_errors(name, section)
            continue
        errors += value_errors(name, section)
        if "path" not in section:
            errors.append(f"config: datasets.{name}.path is required for kind {kind!r} ({SOURCE_LAYOUTS[kind]})")
        else:
            problem = path_problem(kind, section["path"])
            if problem:
                errors.append(f"config: datasets.{name}.path = {section['path']!r}{problem}")
    return errors


# The token groups an attention edge joins: notice.flow.groups.GROUPS (tests/test_flow_experiment.py checks they agree;
# the config checks run before any job and import nothing of the models' side).
FLOW_GROUPS: tuple[str, ...] = ("image", "object", "question", "last", "text")


def flow_errors(config: Mapping[str, Any]) -> list[str]:
    """Each knocked-out edge is "source:target" of two token groups, and is named once."""
    errors, seen = [], set()
    expected = f"expected source:target, each one of {', '.join(FLOW_GROUPS)}"
    for index, edge in enumerate(config["flow"]["edges"]):
        parts = edge.split(":")
        unknown = [part for part in parts if part not in FLOW_GROUPS]
        if len(parts) != 2:
            errors.append(f"config: flow.edges.{index} = {edge!r} is not one source:target pair ({expected})")
        elif unknown:
            errors.append(f"config: flow.edges.{index} = {edge!r}: unknown group {unknown[0]!r} ({expected})")
        elif edge in seen:
            errors.append(f"config: flow.edges.{index} = {edge!r} is listed twice")
        seen.add(edge)
    return errors


def is_local_path(path: str) -> bool:
    """A filesystem path (absolute, ./, ../ or ~), not a Hugging Face id."""
    return os.path.isabs(path) or path.startswith((".", "~"))


def unavailable_models(config: Mapping[str, Any], offline: bool) -> list[str]:
    """A provided model that cannot be loaded stops the run at start, not hours into it.

    Local paths are always checked; hub ids only `offline` (online, Hugging Face may download them).
    """
    from notice.files.hub import resolve_inpaint_model, resolve_offline  # lazy: huggingface_hub

    errors = []
    for name, section in config["models"].items():
        path = section.get("path")
        if path and (offline or is_local_path(path)):
            try:
                resolve_offline(path)
            except FileNotFoundError as error:
                errors.append(f"config: models.{name}.path: {error}")
    inpainted = [name for name in sorted(config["datasets"]) if "sd_inpaint" in dataset_corruptions(config, name)]
    if inpainted:
        model = config["corruptions"]["sd_inpaint"]["model"]
        if offline or is_local_path(model):
            try:
                resolve_inpaint_model(model)
            except FileNotFoundError as error:
                errors.append(f"config: corruptions.sd_inpaint.model (used by datasets {inpainted}): {error}")
    return errors


def checked_config(
    config: Mapping[str, Any], schema_path: str | Path, sources: ConfigSources, offline: bool
) -> dict[str, Any]:
    """`config` with the schema's defaults, or a ValueError with one line per problem.

    The schema first (nothing else can be checked on a config that breaks it); the rest on the filled config.
    """
    schema = load_yaml(schema_path)
    errors = schema_errors(config, schema, sources)
    if errors:
        raise ValueError("\n".join(errors))
    filled = with_defaults(config, schema)
    errors = model_errors(filled) + dataset_errors(filled) + flow_errors(filled)
    errors += unavailable_models(filled, offline) if not errors else []
    if errors:
        raise ValueError("\n".join(errors))
    return filled
