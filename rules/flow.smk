# How the image reaches the answer (config `flow`): on the clean prompt of every selected sample, attention
# knockout between token groups over windows of layers, the logit lens on image tokens and the object-token
# ablation, per (model, dataset, shard) like patching; shards gathered per (model, dataset); figures per model.


rule flow:
    input:
        model_input,
        selected=f"{RESULTS}/{{model}}/{{dataset}}/selected.parquet",
        samples=samples_table,
    output:
        knockout=f"{RESULTS}/{{model}}/{{dataset}}/flow/knockout/{{shard}}.parquet",
        logit_lens=f"{RESULTS}/{{model}}/{{dataset}}/flow/logit_lens/{{shard}}.parquet",
        ablation=f"{RESULTS}/{{model}}/{{dataset}}/flow/ablation/{{shard}}.parquet",
        skipped=f"{RESULTS}/{{model}}/{{dataset}}/flow/skipped/{{shard}}.parquet",
    log:
        f"{RESULTS}/logs/flow/{{model}}/{{dataset}}/{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/flow/{{model}}/{{dataset}}/{{shard}}.tsv"
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
        flow=keys_of(FLOW, "window", "edges", "ablation_draws", "lens_samples", "engine", "batch_size"),
        seed=config["seed"],
        shard=shard_index_count,
    script:
        "../workflow_scripts/flow.py"


rule gather_flow:
    input:
        **{
            table: shard_files(f"{RESULTS}/{{model}}/{{dataset}}/flow/{table}/{{shard}}.parquet")
            for table in FLOW_TABLES
        },
    output:
        **{table: f"{RESULTS}/{{model}}/{{dataset}}/flow/{table}.parquet" for table in FLOW_TABLES},
    log:
        f"{RESULTS}/logs/gather_flow/{{model}}/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/gather_flow/{{model}}/{{dataset}}.tsv"
    conda:
        "../envs/notice.yaml"
    script:
        "../workflow_scripts/gather_flow.py"


rule flow_figures:
    input:
        **{
            table: lambda wildcards, table=table: flow_files(wildcards.model, f"{table}.parquet")
            for table in FLOW_TABLES
        },
    output:
        ablation=f"{RESULTS}/{{model}}/analysis/flow_ablation.csv",
        skipped=f"{RESULTS}/{{model}}/analysis/flow_skipped.csv",
        figures=report(
            directory(f"{RESULTS}/{{model}}/flow_figures"),
            patterns=["{name}.png"],
            caption="../report_captions/flow_figures.rst",
            category="How the image reaches the answer",
            labels={"model": "{model}", "figure": "{name}"},
        ),
    log:
        f"{RESULTS}/logs/flow_figures/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/flow_figures/{{model}}.tsv"
    conda:
        "../envs/notice.yaml"
    params:
        datasets=DATASETS,
    script:
        "../workflow_scripts/flow_figures.py"
