# Circuits (config `circuits`): EAP and EAP-IG edge scores, exact faithfulness curves, the smallest faithful
# circuit and the scores' validation per (model, dataset, corruption); then, per model, the circuits' overlap,
# the heads in every circuit next to the universal heads, and the figures (docs/method.md, §12).


rule circuits:
    input:
        model_input,
        selected=f"{RESULTS}/{{model}}/{{dataset}}/selected.parquet",
        pairs=f"{RESULTS}/{{model}}/{{dataset}}/pairs/{{corruption}}.parquet",
    output:
        edges=f"{RESULTS}/{{model}}/{{dataset}}/circuits/{{corruption}}/edges.parquet",
        faithfulness=f"{RESULTS}/{{model}}/{{dataset}}/circuits/{{corruption}}/faithfulness.parquet",
        summary=f"{RESULTS}/{{model}}/{{dataset}}/circuits/{{corruption}}/summary.csv",
        validation=f"{RESULTS}/{{model}}/{{dataset}}/circuits/{{corruption}}/validation.csv",
        skipped=f"{RESULTS}/{{model}}/{{dataset}}/circuits/{{corruption}}/skipped.csv",
    log:
        f"{RESULTS}/logs/circuits/{{model}}/{{dataset}}/{{corruption}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/circuits/{{model}}/{{dataset}}/{{corruption}}.tsv"
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
        corruption=lambda wildcards: keys_of(corruption_section(wildcards), "nu", "sigma_multiplier"),
        circuits=keys_of(CIRCUITS, *CIRCUIT_KEYS),
        seed=config["seed"],
    script:
        "../workflow_scripts/circuits.py"


rule circuit_overlap:
    input:
        edges=lambda wildcards: circuit_files(wildcards.model, "edges.parquet"),
        faithfulness=lambda wildcards: circuit_files(wildcards.model, "faithfulness.parquet"),
        universal=f"{RESULTS}/{{model}}/analysis/universal_heads.csv",
    output:
        overlap=report(
            f"{RESULTS}/{{model}}/analysis/circuit_overlap.csv",
            caption="../report_captions/circuit_overlap.rst",
            category="Circuits",
            labels={"model": "{model}", "table": "circuit overlap"},
        ),
        shared_heads=f"{RESULTS}/{{model}}/analysis/circuit_shared_heads.csv",
        figures=report(
            directory(f"{RESULTS}/{{model}}/circuit_figures"),
            patterns=["{name}.png"],
            caption="../report_captions/circuit_figures.rst",
            category="Circuits",
            labels={"model": "{model}", "figure": "{name}"},
        ),
    log:
        f"{RESULTS}/logs/circuit_overlap/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/circuit_overlap/{{model}}.tsv"
    conda:
        "../envs/notice.yaml"
    params:
        conditions=lambda wildcards: conditions(),
        target=CIRCUITS["target_faithfulness"],
    script:
        "../workflow_scripts/circuit_overlap.py"
