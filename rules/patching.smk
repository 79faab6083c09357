# Clean activations cached once per (model, dataset); patching per corruption.


rule cache_clean:
    input:
        model_input,
        selected=f"{RESULTS}/{{model}}/{{dataset}}/selected.parquet",
    output:
        cache=f"{RESULTS}/{{model}}/{{dataset}}/clean_cache.pt",
    params:
        model=model_section,
        model_path=lambda wildcards: model_path(wildcards.model),
    resources:
        gpu=1,
    log:
        f"{RESULTS}/logs/cache_clean/{{model}}/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/cache_clean/{{model}}/{{dataset}}.tsv"
    script:
        "../workflow_scripts/cache_clean.py"


rule patch:
    input:
        model_input,
        pairs=f"{RESULTS}/{{model}}/{{dataset}}/pairs/{{corruption}}.parquet",
        cache=f"{RESULTS}/{{model}}/{{dataset}}/clean_cache.pt",
    output:
        results=f"{RESULTS}/{{model}}/{{dataset}}/patching/{{corruption}}.parquet",
    params:
        model=model_section,
        model_path=lambda wildcards: model_path(wildcards.model),
        corruption=corruption_section,
        patching=config["patching"],
    resources:
        gpu=1,
    log:
        f"{RESULTS}/logs/patch/{{model}}/{{dataset}}/{{corruption}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/patch/{{model}}/{{dataset}}/{{corruption}}.tsv"
    script:
        "../workflow_scripts/patch.py"
