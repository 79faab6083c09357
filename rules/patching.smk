# Clean runs cached once per (model, dataset, shard) and shared by every corruption; patching per
# (corruption, shard); shards gathered into one results table per corruption. Shard outputs are kept,
# not temp(): Snakemake judges its rerun triggers (params, code, inputs) on each shard's own output, so
# a changed patching setting is seen on the shards that recorded the old one.


rule cache_clean:
    input:
        model_input,
        selected=f"{RESULTS}/{{model}}/{{dataset}}/selected.parquet",
    output:
        cache=f"{RESULTS}/{{model}}/{{dataset}}/clean_cache/{{shard}}.pt",
    log:
        f"{RESULTS}/logs/cache_clean/{{model}}/{{dataset}}/{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/cache_clean/{{model}}/{{dataset}}/{{shard}}.tsv"
    conda:
        "../envs/notice.yaml"
    threads: GPU_JOBS["threads"]
    resources:
        gpu=1,
        mem_mb=GPU_JOBS["mem_mb"],
        runtime=GPU_JOBS["runtime"],
    params:
        model=model_settings(*LOADING_KEYS),
        model_path=lambda wildcards: model_path(wildcards.model),
        shard=shard_index_count,
    script:
        "../workflow_scripts/cache_clean.py"


rule patch:
    input:
        model_input,
        selected=f"{RESULTS}/{{model}}/{{dataset}}/selected.parquet",
        pairs=f"{RESULTS}/{{model}}/{{dataset}}/pairs/{{corruption}}.parquet",
        cache=f"{RESULTS}/{{model}}/{{dataset}}/clean_cache/{{shard}}.pt",
    output:
        results=f"{RESULTS}/{{model}}/{{dataset}}/patching/{{corruption}}/{{shard}}.parquet",
    log:
        f"{RESULTS}/logs/patch/{{model}}/{{dataset}}/{{corruption}}/{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/patch/{{model}}/{{dataset}}/{{corruption}}/{{shard}}.tsv"
    conda:
        "../envs/notice.yaml"
    threads: GPU_JOBS["threads"]
    resources:
        gpu=1,
        mem_mb=GPU_JOBS["mem_mb"],
        runtime=GPU_JOBS["runtime"],
    params:
        model=model_settings(*LOADING_KEYS),
        model_path=lambda wildcards: model_path(wildcards.model),
        # The noise scale of GN corruptions (n_draws is the pairs' business); SIP / STR / SD-inpaint: none.
        corruption=lambda wildcards: keys_of(corruption_section(wildcards), "nu", "sigma_multiplier"),
        # Not the precision audit's settings (rules/precision.smk): the section as it was before them.
        patching={key: value for key, value in config["patching"].items() if key != "precision_audit"},
        shard=shard_index_count,
    script:
        "../workflow_scripts/patch.py"


rule gather_patching:
    input:
        shard_files(f"{RESULTS}/{{model}}/{{dataset}}/patching/{{corruption}}/{{shard}}.parquet"),
    output:
        results=f"{RESULTS}/{{model}}/{{dataset}}/patching/{{corruption}}.parquet",
    log:
        f"{RESULTS}/logs/gather_patching/{{model}}/{{dataset}}/{{corruption}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/gather_patching/{{model}}/{{dataset}}/{{corruption}}.tsv"
    conda:
        "../envs/notice.yaml"
    script:
        "../workflow_scripts/gather_patching.py"
