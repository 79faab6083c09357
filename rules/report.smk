# One self-contained HTML report over every model (the `snakemake --report` report is made by `make demo`).


rule report:
    input:
        universal=expand(f"{RESULTS}/{{model}}/analysis/universal_heads.csv", model=MODELS),
        significant=expand(f"{RESULTS}/{{model}}/analysis/significant_heads.csv", model=MODELS),
        figures=expand(f"{RESULTS}/{{model}}/figures", model=MODELS),
        accuracy=expand(
            f"{RESULTS}/{{model}}/{{dataset}}/accuracy.csv", model=MODELS, dataset=DATASETS
        ),
    output:
        f"{RESULTS}/report.html",
    params:
        models=MODELS,
        analysis=config["analysis"],
    log:
        f"{RESULTS}/logs/report.log",
    script:
        "../workflow_scripts/report.py"
