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
    log:
        f"{RESULTS}/logs/pairs/{{model}}/{{dataset}}/{{corruption}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pairs/{{model}}/{{dataset}}/{{corruption}}.tsv"
    conda:
        "../envs/notice.yaml"
    params:
        # Only what the job's corruption reads: STR tokenises (the model's template, the questions) and draws
        # partners (seed), GN draws noise seeds (n_draws, seed); SIP and SD-inpaint pairs read none of them.
        corruption=lambda wildcards: keys_of(corruption_section(wildcards), "n_draws"),
        model=only_for(["str"], model_settings(*TOKENIZING_KEYS)),
        model_path=only_for(["str"], lambda wildcards: model_path(wildcards.model)),
        tasks=only_for(["str"], task_settings("question")),
        seed=only_for(["str", "gn_mult", "gn_add"], lambda wildcards: config["seed"]),
    script:
        "../workflow_scripts/pairs.py"
