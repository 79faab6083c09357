# From patching tables to findings: head effects, two-sigma heads, universal heads, figures;
# fusion-attention records of a few samples and the head functions scored from them.


rule analyse_heads:
    input:
        results=lambda wildcards: patching_tables(wildcards.model),
        audits=lambda wildcards: precision_audits(wildcards.model, "patching"),
    output:
        head_effects=f"{RESULTS}/{{model}}/analysis/head_effects.parquet",
        module_effects=f"{RESULTS}/{{model}}/analysis/module_effects.parquet",
        significant=report(
            f"{RESULTS}/{{model}}/analysis/significant_heads.csv",
            caption="../report_captions/significant_heads.rst",
            category="Heads",
            labels={"model": "{model}", "table": "significant heads"},
        ),
        universal=report(
            f"{RESULTS}/{{model}}/analysis/universal_heads.csv",
            caption="../report_captions/universal_heads.rst",
            category="Heads",
            labels={"model": "{model}", "table": "universal heads"},
        ),
    log:
        f"{RESULTS}/logs/analyse_heads/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/analyse_heads/{{model}}.tsv"
    conda:
        "../envs/notice.yaml"
    params:
        analysis=lambda wildcards: with_precision_k(
            keys_of(config["analysis"], "metric", "k_sigma", "bootstrap_draws", "universal_corruptions"),
            [wildcards.model],
        ),
        seed=config["seed"],
    script:
        "../workflow_scripts/analyse_heads.py"


rule figures:
    input:
        head_effects=f"{RESULTS}/{{model}}/analysis/head_effects.parquet",
        module_effects=f"{RESULTS}/{{model}}/analysis/module_effects.parquet",
        universal=f"{RESULTS}/{{model}}/analysis/universal_heads.csv",
        accuracy=lambda wildcards: [f"{RESULTS}/{wildcards.model}/{dataset}/accuracy.csv" for dataset in DATASETS],
        attention=lambda wildcards: attention_dirs(wildcards.model),
        head_functions=f"{RESULTS}/{{model}}/analysis/head_functions.csv",
    output:
        figures=report(
            directory(f"{RESULTS}/{{model}}/figures"),
            patterns=["{name}.png"],
            caption="../report_captions/figures.rst",
            category="Figures",
            labels={"model": "{model}", "figure": "{name}"},
        ),
    log:
        f"{RESULTS}/logs/figures/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/figures/{{model}}.tsv"
    conda:
        "../envs/notice.yaml"
    params:
        analysis=keys_of(config["analysis"], "k_sigma", "overlay_samples", "overlay_heads"),
        datasets=DATASETS,
    script:
        "../workflow_scripts/figures.py"


rule attention_patterns:
    input:
        model_input,
        selected=f"{RESULTS}/{{model}}/{{dataset}}/selected.parquet",
    output:
        attention=directory(f"{RESULTS}/{{model}}/{{dataset}}/attention"),
    log:
        f"{RESULTS}/logs/attention_patterns/{{model}}/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/attention_patterns/{{model}}/{{dataset}}.tsv"
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
        n_samples=config["analysis"]["attention_samples"],
        seed=config["seed"],
    script:
        "../workflow_scripts/attention_patterns.py"


rule head_functions:
    input:
        attention=lambda wildcards: attention_dirs(wildcards.model),
    output:
        scores=f"{RESULTS}/{{model}}/analysis/head_functions.csv",
        markdown=f"{RESULTS}/{{model}}/analysis/head_functions.md",
        grounding=f"{RESULTS}/{{model}}/analysis/grounding.csv",
    log:
        f"{RESULTS}/logs/head_functions/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/head_functions/{{model}}.tsv"
    conda:
        "../envs/notice.yaml"
    params:
        datasets=DATASETS,
        thresholds=config["analysis"]["head_functions"],
    script:
        "../workflow_scripts/head_functions.py"
