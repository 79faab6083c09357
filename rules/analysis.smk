# From patching tables to findings: head effects, two-sigma heads, universal heads, figures.


rule analyse_heads:
    input:
        results=lambda wildcards: patching_tables(wildcards.model),
    output:
        head_effects=f"{RESULTS}/{{model}}/analysis/head_effects.parquet",
        module_effects=f"{RESULTS}/{{model}}/analysis/module_effects.parquet",
        significant=report(
            f"{RESULTS}/{{model}}/analysis/significant_heads.csv",
            caption="../report/significant_heads.rst",
            category="Heads",
            labels={"model": "{model}", "table": "significant heads"},
        ),
        universal=report(
            f"{RESULTS}/{{model}}/analysis/universal_heads.csv",
            caption="../report/universal_heads.rst",
            category="Heads",
            labels={"model": "{model}", "table": "universal heads"},
        ),
    params:
        analysis=config["analysis"],
        seed=config["seed"],
    log:
        f"{RESULTS}/logs/analyse_heads/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/analyse_heads/{{model}}.tsv"
    script:
        "../workflow_scripts/analyse_heads.py"


rule figures:
    input:
        head_effects=f"{RESULTS}/{{model}}/analysis/head_effects.parquet",
        module_effects=f"{RESULTS}/{{model}}/analysis/module_effects.parquet",
        universal=f"{RESULTS}/{{model}}/analysis/universal_heads.csv",
        accuracy=lambda wildcards: [
            f"{RESULTS}/{wildcards.model}/{dataset}/accuracy.csv" for dataset in DATASETS
        ],
    output:
        figures=report(
            directory(f"{RESULTS}/{{model}}/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
            labels={"model": "{model}", "figure": "{name}"},
        ),
    params:
        analysis=config["analysis"],
    log:
        f"{RESULTS}/logs/figures/{{model}}.log",
    script:
        "../workflow_scripts/figures.py"
