# Corruption manifests: what the corrupt run of every selected sample sees.


rule pairs:
    input:
        model_input,
        unpack(corruption_inputs),  # pool (sd_inpaint: the generated images) and inpaint exclusions
        selected=f"{RESULTS}/{{model}}/{{dataset}}/selected.parquet",
        samples=samples_table,
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
