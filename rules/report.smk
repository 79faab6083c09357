# One self-contained HTML report over every model, and the paper's Tables 1-3 as CSV + Markdown
# (the `snakemake --report` report is made by `make demo`).


rule report:
    input:
        universal=expand(f"{RESULTS}/{{model}}/analysis/universal_heads.csv", model=MODELS),
        significant=expand(f"{RESULTS}/{{model}}/analysis/significant_heads.csv", model=MODELS),
        figures=expand(f"{RESULTS}/{{model}}/figures", model=MODELS),
        accuracy=expand(f"{RESULTS}/{{model}}/{{dataset}}/accuracy.csv", model=MODELS, dataset=DATASETS),
        head_functions=expand(f"{RESULTS}/{{model}}/analysis/head_functions.csv", model=MODELS),
        grounding=expand(f"{RESULTS}/{{model}}/analysis/grounding.csv", model=MODELS),
        screen_validation=screen_outputs("validation"),
        screen_misses=screen_outputs("misses"),
        screen_object_fraction=screen_outputs("object_fraction"),
        screen_figures=screen_outputs("figures"),
        precision=[audit for model in MODELS for audit in precision_audits(model, "patching")],
        screen_precision=(
            [audit for model in MODELS for audit in precision_audits(model, "screen")] if SCREEN["enabled"] else []
        ),
        flow_figures=flow_outputs("figures"),
        flow_ablation=flow_outputs("ablation"),
        flow_skipped=flow_outputs("skipped"),
        circuit_summary=circuit_outputs("summary"),
        circuit_validation=circuit_outputs("validation"),
        circuit_skipped=circuit_outputs("skipped"),
        circuit_overlap=circuit_outputs("overlap"),
        circuit_shared_heads=circuit_outputs("shared_heads"),
        circuit_figures=circuit_outputs("figures"),
    output:
        report=f"{RESULTS}/report.html",
        table1=multiext(f"{RESULTS}/tables/table1_universal_heads", ".csv", ".md"),
        table2=multiext(f"{RESULTS}/tables/table2_accuracy", ".csv", ".md"),
        table3=multiext(f"{RESULTS}/tables/table3_head_functions", ".csv", ".md"),
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    conda:
        "../envs/notice.yaml"
    params:
        models=MODELS,
        analysis=with_precision_k(
            keys_of(config["analysis"], "k_sigma", "universal_corruptions", "head_functions"), MODELS
        ),
    script:
        "../workflow_scripts/report.py"
