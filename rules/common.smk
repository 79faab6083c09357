# Helpers shared by every stage: config validation, paths, per-section params, target list.
import os
import re

from notice.workflow import config as config_checks

CONFIG_SCHEMA = os.path.join(workflow.basedir, "config/schemas/config.schema.yaml")
CONFIG_FILES = [str(f) for f in workflow.overwrite_configfiles] or [
    os.path.join(workflow.basedir, "config/config.yaml")
]

# A problem stops the run here, one line each (notice.workflow.config); then the config has the schema's defaults.
config.update(
    config_checks.checked_config(
        config,
        CONFIG_SCHEMA,
        config_checks.ConfigSources.read(CONFIG_FILES, workflow.config_settings.config),
        offline=os.environ.get("HF_HUB_OFFLINE") == "1",
    )
)

RESULTS = config["results_dir"]
RESOURCES = config["resources_dir"]
DATASETS = sorted(config["datasets"])
MODELS = sorted(config["models"])
CORRUPTIONS = sorted(config["corruptions"])


wildcard_constraints:
    dataset="|".join(map(re.escape, DATASETS)),
    model="|".join(map(re.escape, MODELS)),
    corruption="|".join(map(re.escape, CORRUPTIONS)),


def datasets_of_kind(kind):
    return sorted(name for name, section in config["datasets"].items() if section["kind"] == kind)


def kind_constraint(kind):
    """Wildcard regex of the datasets of `kind` (matches nothing when there are none)."""
    names = datasets_of_kind(kind)
    return "|".join(map(re.escape, names)) if names else "(?!)"


def training_image_size(train):
    """Image size of a toy model's training dataset (`train` is the model's `train` section)."""
    return config_checks.training_image_size(config, train)


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
    return config_checks.dataset_corruptions(config, dataset)


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


# -- the precision audit of half-precision models (rules/precision.smk) ----------------------------------
def half_models():
    """The models patched in float16 / bfloat16: each has a precision audit."""
    from notice.method.precision import is_half  # lazy, as below: every job parses the Snakefile

    return [model for model in MODELS if is_half(config["models"][model]["dtype"])]


def precision_audits(model, stage):
    """The precision audit of `model` per condition, of its patching tables (`stage` "patching") or of its
    screen ("screen"); none for a full-precision model."""
    if model not in half_models():
        return []
    return [f"{RESULTS}/{model}/{dataset}/{stage}/{corruption}.precision.csv" for dataset, corruption in conditions()]


def with_precision_k(settings, models):
    """Params value: `settings` (part of the analysis section) with `analysis.precision_k` when one of `models`
    is half precision; as they are otherwise, so that a full-precision run's jobs keep their params."""
    if any(model in half_models() for model in models):
        return {**settings, "precision_k": config["analysis"]["precision_k"]}
    return settings


def all_targets():
    targets = [f"{RESULTS}/report.html"]
    for model in MODELS:
        targets += [
            f"{RESULTS}/{model}/analysis/universal_heads.csv",
            f"{RESULTS}/{model}/figures",
        ]
    return targets + flow_outputs("figures")


# -- shards: per-sample GPU work is split into `sharding.n_shards` jobs, then gathered ----------
N_SHARDS = config["sharding"]["n_shards"]
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
GPU_JOBS = config["gpu_jobs"]


# -- the attribution screen (config `screen`) ------------------------------------------------------
SCREEN = config["screen"]


def screen_files(model, suffix):
    """One screen output of `model` (table ".parquet", "_confirmed.parquet" or the "_maps" folder) per condition."""
    return [f"{RESULTS}/{model}/{dataset}/screen/{corruption}{suffix}" for dataset, corruption in conditions()]


def screen_outputs(name):
    """Input function of the report: the validation's `name` output of every model, none with the screen off."""
    files = {"validation": "analysis/screen_validation.csv", "misses": "analysis/screen_misses.csv"}
    files |= {"object_fraction": "analysis/screen_object_fraction.csv", "figures": "screen_figures"}
    return [f"{RESULTS}/{model}/{files[name]}" for model in MODELS] if SCREEN["enabled"] else []


# -- circuits (config `circuits`, rules/circuits.smk) -----------------------------------------------------------
CIRCUITS = config["circuits"]
# What the circuits job reads of the section (the seed comes from the top level).
CIRCUIT_KEYS = (
    "ig_steps",
    "target_faithfulness",
    "curve_points",
    "validation_edges",
    "validation_top_k",
    "max_pairs",
)


def circuit_files(model, name):
    """One circuits output of `model` (`name`, e.g. "edges.parquet") per condition."""
    return [f"{RESULTS}/{model}/{dataset}/circuits/{corruption}/{name}" for dataset, corruption in conditions()]


def circuit_outputs(name):
    """Input function of the report: every model's circuit `name` output ("summary", "validation", "skipped": one
    per condition; "overlap", "shared_heads", "figures": one per model), none with the circuits off."""
    if not CIRCUITS["enabled"]:
        return []
    if name in ("summary", "validation", "skipped"):
        return [path for model in MODELS for path in circuit_files(model, f"{name}.csv")]
    files = {
        "overlap": "analysis/circuit_overlap.csv",
        "shared_heads": "analysis/circuit_shared_heads.csv",
        "figures": "circuit_figures",
    }
    return [f"{RESULTS}/{model}/{files[name]}" for model in MODELS]


# -- how the image reaches the answer (config `flow`, rules/flow.smk) ----------------------------------------
FLOW = config["flow"]
FLOW_TABLES = ("knockout", "logit_lens", "ablation", "skipped")


def flow_files(model, name):
    """One flow table of `model` (`name`, e.g. "knockout.parquet") per dataset."""
    return [f"{RESULTS}/{model}/{dataset}/flow/{name}" for dataset in DATASETS]


def flow_outputs(name):
    """Every model's flow `name` output ("figures": its figure folder; "ablation", "skipped": its summaries of the
    ablation and of what was skipped), none with the flow stage off."""
    files = {
        "figures": "flow_figures",
        "ablation": "analysis/flow_ablation.csv",
        "skipped": "analysis/flow_skipped.csv",
    }
    return [f"{RESULTS}/{model}/{files[name]}" for model in MODELS] if FLOW["enabled"] else []
