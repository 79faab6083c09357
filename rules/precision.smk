# The precision audit of every half-precision model (docs/method.md, §6 "Precision"): a seeded sample of each
# patching table's rows patched again on the model in float32, and the attribution screen of the same pairs.

# Only the half-precision models have these jobs (a full-precision model's audit is no target of any rule).
HALF_MODEL = "|".join(map(re.escape, half_models())) or "(?!)"


rule precision_audit:
    input:
        model_input,
        results=f"{RESULTS}/{{model}}/{{dataset}}/patching/{{corruption}}.parquet",
        pairs=f"{RESULTS}/{{model}}/{{dataset}}/pairs/{{corruption}}.parquet",
    output:
        audit=f"{RESULTS}/{{model}}/{{dataset}}/patching/{{corruption}}.precision.csv",
        rows=f"{RESULTS}/{{model}}/{{dataset}}/patching/{{corruption}}.precision_rows.parquet",
    log:
        f"{RESULTS}/logs/precision_audit/{{model}}/{{dataset}}/{{corruption}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/precision_audit/{{model}}/{{dataset}}/{{corruption}}.tsv"
    wildcard_constraints:
        model=HALF_MODEL,
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
        audit=keys_of(config["patching"]["precision_audit"], "rows", "device"),
        seed=config["seed"],
    script:
        "../workflow_scripts/precision_audit.py"


rule screen_precision_audit:
    input:
        model_input,
        screen=f"{RESULTS}/{{model}}/{{dataset}}/screen/{{corruption}}.parquet",
        rows=f"{RESULTS}/{{model}}/{{dataset}}/patching/{{corruption}}.precision_rows.parquet",
        pairs=f"{RESULTS}/{{model}}/{{dataset}}/pairs/{{corruption}}.parquet",
    output:
        audit=f"{RESULTS}/{{model}}/{{dataset}}/screen/{{corruption}}.precision.csv",
    log:
        f"{RESULTS}/logs/screen_precision_audit/{{model}}/{{dataset}}/{{corruption}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/screen_precision_audit/{{model}}/{{dataset}}/{{corruption}}.tsv"
    wildcard_constraints:
        model=HALF_MODEL,
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
        audit=keys_of(config["patching"]["precision_audit"], "device"),
        screen=keys_of(SCREEN, "method", "qk_fix", "grad_drop", "sites"),
    script:
        "../workflow_scripts/screen_precision_audit.py"
