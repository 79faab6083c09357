# Corruption manifests: what the corrupt run of every selected sample sees.


rule pairs:
    input:
        model_input,
        selected=f"{RESULTS}/{{model}}/{{dataset}}/selected.parquet",
        samples=samples_table,
        pool=image_pool,
    output:
        pairs=f"{RESULTS}/{{model}}/{{dataset}}/pairs/{{corruption}}.parquet",
        exclusions=f"{RESULTS}/{{model}}/{{dataset}}/pairs/{{corruption}}.exclusions.parquet",
    params:
        corruption=corruption_section,
        model=model_section,
        model_path=lambda wildcards: model_path(wildcards.model),
        tasks=lambda wildcards: config["datasets"][wildcards.dataset]["tasks"],
        seed=config["seed"],
    log:
        f"{RESULTS}/logs/pairs/{{model}}/{{dataset}}/{{corruption}}.log",
    script:
        "../workflow_scripts/pairs.py"
