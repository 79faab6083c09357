# NOTICE workflow: causal activation patching of VLMs with semantic corruptions.
# Stages live in rules/*.smk; the science lives in the `notice` package.
import os

from snakemake.utils import min_version

min_version("9.0")


# The embedded demo is the default; a --configfile replaces it (no merging of the two). --config
# key=value overrides go on top of either (the configfile directive re-applies them after loading).
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config/config.yaml")


include: "rules/common.smk"
include: "rules/datasets.smk"
include: "rules/real_datasets.smk"
include: "rules/models.smk"
include: "rules/distractors.smk"
include: "rules/evaluate.smk"
include: "rules/pairs.smk"
include: "rules/patching.smk"
include: "rules/analysis.smk"
include: "rules/screen.smk"
include: "rules/flow.smk"
include: "rules/circuits.smk"
include: "rules/precision.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
