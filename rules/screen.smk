# The attribution screen (config `screen`): AtP estimates of every site at every position per pair, the
# exact confirmation of each pair's top-ranked sites and the image-token maps, per (model, dataset,
# corruption); then, per model, its validation against every exact effect with the same keys.


rule screen:
    input:
        model_input,
        selected=f"{RESULTS}/{{model}}/{{dataset}}/selected.parquet",
        pairs=f"{RESULTS}/{{model}}/{{dataset}}/pairs/{{corruption}}.parquet",
    output:
        screen=f"{RESULTS}/{{model}}/{{dataset}}/screen/{{corruption}}.parquet",
        confirmed=f"{RESULTS}/{{model}}/{{dataset}}/screen/{{corruption}}_confirmed.parquet",
        maps=directory(f"{RESULTS}/{{model}}/{{dataset}}/screen/{{corruption}}_maps"),
    log:
        f"{RESULTS}/logs/screen/{{model}}/{{dataset}}/{{corruption}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/screen/{{model}}/{{dataset}}/{{corruption}}.tsv"
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
        patching=keys_of(config["patching"], "engine", "batch_size"),
        screen=keys_of(SCREEN, "method", "qk_fix", "grad_drop", "sites", "confirm_top"),
    script:
        "../workflow_scripts/screen.py"


rule validate_screen:
    input:
        screens=lambda wildcards: screen_files(wildcards.model, ".parquet"),
        confirmed=lambda wildcards: screen_files(wildcards.model, "_confirmed.parquet"),
        maps=lambda wildcards: screen_files(wildcards.model, "_maps"),
        exact=lambda wildcards: patching_tables(wildcards.model),
    output:
        validation=report(
            f"{RESULTS}/{{model}}/analysis/screen_validation.csv",
            caption="../report_captions/screen_validation.rst",
            category="Attribution screen",
            labels={"model": "{model}", "table": "screen validation"},
        ),
        misses=f"{RESULTS}/{{model}}/analysis/screen_misses.csv",
        object_fraction=f"{RESULTS}/{{model}}/analysis/screen_object_fraction.csv",
        figures=report(
            directory(f"{RESULTS}/{{model}}/screen_figures"),
            patterns=["{name}.png"],
            caption="../report_captions/screen_figures.rst",
            category="Attribution screen",
            labels={"model": "{model}", "figure": "{name}"},
        ),
    log:
        f"{RESULTS}/logs/validate_screen/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/validate_screen/{{model}}.tsv"
    conda:
        "../envs/notice.yaml"
    params:
        conditions=lambda wildcards: conditions(),
        screen=keys_of(SCREEN, "top_k", "map_samples"),
        dtype=lambda wildcards: config["models"][wildcards.model]["dtype"],
    script:
        "../workflow_scripts/validate_screen.py"
