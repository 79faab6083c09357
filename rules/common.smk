# Helpers shared by every stage: config validation, paths, per-section params, target list.
import os
import re
from pathlib import Path

import jsonschema
import yaml
from snakemake.utils import validate

CONFIG_SCHEMA = os.path.join(workflow.basedir, "config/schemas/config.schema.yaml")


def _has_key(data, path):
    """Whether the nested `data` has a value at the key path `path`."""
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return False
    return True


def config_errors():
    """One line per schema violation: where it was set (--config, else the config file), key path, expectation."""
    files = [str(f) for f in workflow.overwrite_configfiles] or [os.path.join(workflow.basedir, "config/config.yaml")]
    sources = [("--config", workflow.config_settings.config)]
    sources += [(f, yaml.safe_load(Path(f).read_text())) for f in reversed(files)]
    lines = {}
    for error in jsonschema.Draft202012Validator(yaml.safe_load(Path(CONFIG_SCHEMA).read_text())).iter_errors(config):
        path, known = list(error.absolute_path), error.schema.get("properties", {})
        if error.validator == "additionalProperties" and error.validator_value is False:
            found = [
                (path + [key], f"unknown key (expected one of: {', '.join(known)})")
                for key in error.instance
                if key not in known
            ]
        elif error.validator == "required":
            found = [
                (path + [key], "required key missing") for key in error.validator_value if key not in error.instance
            ]
        elif error.validator in ("oneOf", "anyOf"):
            exactly = "exactly " if error.validator == "oneOf" else ""
            found = [(path, f"expected {exactly}one of the schemas {error.validator_value}")]
        else:
            found = [(path, error.message)]
        for key_path, what in found:
            if error.validator == "required":  # set nowhere: blame the first source of the mapping that lacks it
                where = [name for name, data in reversed(sources) if _has_key(data, key_path[:-1])]
            else:  # blame the last source that sets it
                where = [name for name, data in sources if _has_key(data, key_path)]
            source = (where or [", ".join(files)])[0]
            if source == "--config" and len(key_path) > 1 and error.validator == "type":
                what += " (Snakemake reads nested --config values as strings: set this key in a --configfile)"
            lines[f"config error in {source}: {'.'.join(map(str, key_path))}: {what}"] = None
    return list(lines)


def validate_config():
    """Stop on a schema violation in a few lines (not jsonschema's dump), then fill in the schema's defaults."""
    errors = config_errors()
    if errors:
        raise ValueError("\n".join(errors))
    validate(config, schema=CONFIG_SCHEMA, set_default=True)


validate_config()

RESULTS = config.get("results_dir", "results")
RESOURCES = config.get("resources_dir", "resources")
DATASETS = sorted(config["datasets"])
MODELS = sorted(config["models"])
CORRUPTIONS = sorted(config["corruptions"])


wildcard_constraints:
    dataset="|".join(map(re.escape, DATASETS)),
    model="|".join(map(re.escape, MODELS)),
    corruption="|".join(map(re.escape, CORRUPTIONS)),


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


def datasets_of_kind(kind):
    return sorted(name for name, section in config["datasets"].items() if section["kind"] == kind)


def kind_constraint(kind):
    """Wildcard regex of the datasets of `kind` (matches nothing when there are none)."""
    names = datasets_of_kind(kind)
    return "|".join(map(re.escape, names)) if names else "(?!)"


def training_image_size(train):
    """Image size of a toy model's training dataset (`train` is the model's `train` section)."""
    return config["datasets"][train["dataset"]].get("image_size", 64)


def check_config_references():
    """Names used inside sections must exist, toy architectures must fit: fail at start, naming the key."""
    from notice.demo.toy_config import configs_from_settings

    for name, section in config["models"].items():
        train = section.get("train")
        if not train:
            continue
        if train["dataset"] not in config["datasets"]:
            raise ValueError(
                f"config: models.{name}.train.dataset = {train['dataset']!r} is not a dataset "
                f"(expected one of {DATASETS})"
            )
        try:
            configs_from_settings(train, training_image_size(train))
        except ValueError as error:
            raise ValueError(f"config: models.{name}.train: {error}") from None
    for name, section in config["datasets"].items():
        for corruption in section.get("corruptions", []):
            if corruption not in config["corruptions"]:
                raise ValueError(
                    f"config: datasets.{name}.corruptions has {corruption!r}, which is not in the "
                    f"top-level corruptions section (expected one of {CORRUPTIONS})"
                )
    for name, section in config["datasets"].items():
        kind = section["kind"]
        for key in sorted(set(section) & set(KIND_ONLY_KEYS)):
            if kind not in KIND_ONLY_KEYS[key]:
                raise ValueError(
                    f"config: datasets.{name}.{key} is only for kind {' / '.join(KIND_ONLY_KEYS[key])}, "
                    f"not {kind!r}"
                )
        if "sd_inpaint" in section.get("corruptions", CORRUPTIONS) and kind != "svo_probes":
            raise ValueError(
                f"config: datasets.{name}.corruptions has 'sd_inpaint', which needs SVO-Probes triplets "
                f"(kind svo_probes), not kind {kind!r}; list the dataset's corruptions without it"
            )
        if kind == "synthetic":
            continue
        if "path" not in section:
            raise ValueError(f"config: datasets.{name}.path is required for kind {kind!r} ({SOURCE_LAYOUTS[kind]})")
        path = section["path"]
        if kind == "samples_table":
            for table in ("samples.parquet", "image_pool.parquet"):
                if not os.path.exists(os.path.join(path, table)):
                    raise ValueError(
                        f"config: datasets.{name}.path = {path!r}: {table} not found there "
                        f"(expected {SOURCE_LAYOUTS[kind]})"
                    )
            continue
        is_file, has_images = os.path.isfile(path), os.path.isdir(os.path.join(path, "images"))
        wanted_file = kind == "svo_probes" or (kind == "facial_expressions" and not os.path.isdir(path))
        if not os.path.exists(path):
            problem = "does not exist"
        elif wanted_file and not is_file:
            problem = "is not a file"
        elif kind == "mit_states" and not has_images:  # a FER directory may hold the split folders directly
            problem = "has no images/ folder"
        else:
            continue
        raise ValueError(
            f"config: datasets.{name}.path = {path!r} {problem} (kind {kind}: expected {SOURCE_LAYOUTS[kind]}; "
            "see config/README.md, Real datasets)"
        )


def is_local_path(path):
    """A filesystem path (absolute, ./, ../ or ~), not a Hugging Face id."""
    return os.path.isabs(path) or path.startswith((".", "~"))


def check_models_available():
    """A provided model that cannot be loaded stops the run now, not hours into it.

    Local paths are always checked; hub ids only offline (online, Hugging Face may download them).
    """
    from notice.files.hub import resolve_inpaint_model, resolve_offline

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    for name, section in config["models"].items():
        path = section.get("path")
        if path and (offline or is_local_path(path)):
            try:
                resolve_offline(path)
            except FileNotFoundError as error:
                raise ValueError(f"config: models.{name}.path: {error}") from None
    inpainted = [name for name in DATASETS if "sd_inpaint" in config["datasets"][name].get("corruptions", CORRUPTIONS)]
    if inpainted:
        model = config["corruptions"]["sd_inpaint"]["model"]  # the schema fills in the default
        if offline or is_local_path(model):
            try:
                resolve_inpaint_model(model)
            except FileNotFoundError as error:
                raise ValueError(
                    f"config: corruptions.sd_inpaint.model (used by datasets {inpainted}): {error}"
                ) from None


check_config_references()
check_models_available()


def dataset_section(wildcards):
    return config["datasets"][wildcards.dataset]


def dataset_source(wildcards):
    """The dataset's `path` as the user has it on disk (input of the real-dataset readers)."""
    return config["datasets"][wildcards.dataset]["path"]


def keys_of(section, *keys):
    """The `keys` that `section` has: a rule's params hold only what its script reads, so that changing any
    other config key reruns nothing."""
    return {key: section[key] for key in keys if key in section}


def task_settings(*keys):
    """Params function: the dataset's tasks with only their `keys` (e.g. question)."""
    return lambda wildcards: {task: keys_of(spec, *keys) for task, spec in dataset_section(wildcards)["tasks"].items()}


def read_settings(wildcards):
    """What the real-dataset readers read of the dataset's section (not its questions, values or distractors)."""
    settings = keys_of(dataset_section(wildcards), "path", "splits", "max_rows", "exclude_words")
    return {**settings, "tasks": task_settings("groups")(wildcards)}


def source_fingerprint(wildcards):
    """A folder source's file listing (its images/ folder, else itself) as a params value: adding, removing or
    rewriting a file below it reruns the reader, which the folder's mtime would not. A file source: ""."""
    from notice.data.listing import tree_fingerprint

    path = dataset_source(wildcards)
    if not os.path.isdir(path):
        return ""
    images = os.path.join(path, "images")
    return tree_fingerprint(images if os.path.isdir(images) else path)


# What notice.workflow.runtime.load_model reads of a model section (load_tokenizing_model: TOKENIZING_KEYS).
TOKENIZING_KEYS = ("prompt_template", "adapter")
LOADING_KEYS = ("device", "dtype", *TOKENIZING_KEYS)


def model_settings(*keys):
    """Params function: the model section's `keys` only."""
    return lambda wildcards: keys_of(config["models"][wildcards.model], *keys)


def dataset_dir(dataset):
    """Where the dataset's samples.parquet and image_pool.parquet are (generated or the user's)."""
    section = config["datasets"][dataset]
    return section["path"] if section["kind"] == "samples_table" else f"{RESOURCES}/datasets/{dataset}"


def samples_table(wildcards):
    return f"{dataset_dir(wildcards.dataset)}/samples.parquet"


def image_pool(wildcards):
    """SIP corrupt images: the dataset's pool; for sd_inpaint, the images the inpaint rule generated."""
    if wildcards.get("corruption") == "sd_inpaint":
        return f"{inpaint_dir(wildcards)}/image_pool.parquet"
    return f"{dataset_dir(wildcards.dataset)}/image_pool.parquet"


def inpaint_dir(wildcards):
    return f"{RESULTS}/{wildcards.model}/{wildcards.dataset}/sd_inpaint"


def corruption_inputs(wildcards):
    """The corruption-dependent inputs of `pairs` (unpacked there): the pool, and inpaint exclusions."""
    inputs = {"pool": image_pool(wildcards)}
    if wildcards.corruption == "sd_inpaint":
        inputs["inpaint_exclusions"] = f"{inpaint_dir(wildcards)}/exclusions.parquet"
    return inputs


def trained_model_dir(model):
    return f"{RESOURCES}/models/{model}"


def model_path(model):
    """What the adapter loads: a Hugging Face id, a local directory, or the trained toy model."""
    section = config["models"][model]
    return section["path"] if "path" in section else trained_model_dir(model)


def model_input(wildcards):
    """The trained toy model's directory; nothing for a model the user provides."""
    if "train" in config["models"][wildcards.model]:
        return [trained_model_dir(wildcards.model)]
    return []


def dataset_corruptions(dataset):
    return config["datasets"][dataset].get("corruptions", CORRUPTIONS)


def corruption_section(wildcards):
    return config["corruptions"][wildcards.corruption]


def only_for(corruptions, function):
    """Params function: `function`'s value for the jobs of `corruptions`, None for the others (they do not read it)."""
    return lambda wildcards: function(wildcards) if wildcards.corruption in corruptions else None


def conditions():
    """(dataset, corruption) of every patching (and screen) table, in the order their file lists give them."""
    return [(dataset, corruption) for dataset in DATASETS for corruption in dataset_corruptions(dataset)]


def patching_tables(model):
    return [f"{RESULTS}/{model}/{dataset}/patching/{corruption}.parquet" for dataset, corruption in conditions()]


def attention_dirs(model):
    """The attention records of `model` on every dataset (inputs of its head-function scores)."""
    return [f"{RESULTS}/{model}/{dataset}/attention" for dataset in DATASETS]


def all_targets():
    targets = [f"{RESULTS}/report.html"]
    for model in MODELS:
        targets += [
            f"{RESULTS}/{model}/analysis/universal_heads.csv",
            f"{RESULTS}/{model}/figures",
        ]
    return targets


# -- shards: per-sample GPU work is split into `sharding.n_shards` jobs, then gathered ----------
N_SHARDS = config.get("sharding", {}).get("n_shards", 1)
SHARDS = [f"shard{index}-of{N_SHARDS}" for index in range(N_SHARDS)]


wildcard_constraints:
    shard=r"shard\d+-of\d+",


def shard_index_count(wildcards):
    """(index, count) of the job's shard wildcard, e.g. shard2-of4 -> (2, 4)."""
    index, count = wildcards.shard[len("shard") :].split("-of")
    return int(index), int(count)


def shard_files(pattern):
    """Input function: `pattern` (with {model}, {dataset}, {corruption}, {shard}) for every shard."""

    def files(wildcards):
        return [pattern.format(**dict(wildcards.items()), shard=shard) for shard in SHARDS]

    return files


# -- GPU jobs (resources: gpu=1): cores, host memory (MB) and wall time (minutes), config `gpu_jobs` --
GPU_JOBS = {"threads": 2, "mem_mb": 16000, "runtime": 240, **config.get("gpu_jobs", {})}


# -- the attribution screen (config `screen`) ------------------------------------------------------
SCREEN = config.get("screen", {})


def screen_files(model, suffix):
    """One screen output of `model` (table ".parquet", "_confirmed.parquet" or the "_maps" folder) per condition."""
    return [f"{RESULTS}/{model}/{dataset}/screen/{corruption}{suffix}" for dataset, corruption in conditions()]


def screen_outputs(name):
    """Input function of the report: the validation's `name` output of every model, none with the screen off."""
    files = {"validation": "analysis/screen_validation.csv", "misses": "analysis/screen_misses.csv"}
    files |= {"object_fraction": "analysis/screen_object_fraction.csv", "figures": "screen_figures"}
    return [f"{RESULTS}/{model}/{files[name]}" for model in MODELS] if SCREEN.get("enabled") else []
