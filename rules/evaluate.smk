# Clean prompts, the model's answers, accuracy (paper Table 2) and the balanced selection.


rule prompts:
    input:
        model_input,
        samples=samples_table,
        distractors=f"{RESULTS}/datasets/{{dataset}}/distractors.parquet",
    output:
        prompts=f"{RESULTS}/{{model}}/{{dataset}}/prompts.parquet",
        exclusions=f"{RESULTS}/{{model}}/{{dataset}}/prompt_exclusions.parquet",
    log:
        f"{RESULTS}/logs/prompts/{{model}}/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prompts/{{model}}/{{dataset}}.tsv"
    conda:
        "../envs/notice.yaml"
    params:
        model=model_settings(*TOKENIZING_KEYS),
        model_path=lambda wildcards: model_path(wildcards.model),
        tasks=task_settings("question"),
        seed=config["seed"],
    script:
        "../workflow_scripts/prompts.py"


rule evaluate_shard:
    input:
        model_input,
        prompts=f"{RESULTS}/{{model}}/{{dataset}}/prompts.parquet",
    output:
        answers=f"{RESULTS}/{{model}}/{{dataset}}/answers/{{shard}}.parquet",
    log:
        f"{RESULTS}/logs/evaluate/{{model}}/{{dataset}}/{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{model}}/{{dataset}}/{{shard}}.tsv"
    conda:
        "../envs/notice.yaml"
    threads: GPU_JOBS["threads"]
    resources:
        gpu=1,
        mem_mb=GPU_JOBS["mem_mb"],
        runtime=GPU_JOBS["runtime"],
    params:
        model=model_settings(*LOADING_KEYS, "max_new_tokens"),
        model_path=lambda wildcards: model_path(wildcards.model),
        shard=shard_index_count,
    script:
        "../workflow_scripts/evaluate.py"


rule gather_answers:
    input:
        shard_files(f"{RESULTS}/{{model}}/{{dataset}}/answers/{{shard}}.parquet"),
    output:
        answers=f"{RESULTS}/{{model}}/{{dataset}}/answers.parquet",
        accuracy=report(
            f"{RESULTS}/{{model}}/{{dataset}}/accuracy.csv",
            caption="../report_captions/accuracy.rst",
            category="Accuracy",
            labels={"model": "{model}", "dataset": "{dataset}"},
        ),
    log:
        f"{RESULTS}/logs/gather_answers/{{model}}/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/gather_answers/{{model}}/{{dataset}}.tsv"
    conda:
        "../envs/notice.yaml"
    script:
        "../workflow_scripts/gather_answers.py"


rule select_samples:
    input:
        answers=f"{RESULTS}/{{model}}/{{dataset}}/answers.parquet",
    output:
        selected=f"{RESULTS}/{{model}}/{{dataset}}/selected.parquet",
    log:
        f"{RESULTS}/logs/select_samples/{{model}}/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/select_samples/{{model}}/{{dataset}}.tsv"
    conda:
        "../envs/notice.yaml"
    params:
        selection=config["selection"],
        tasks=lambda wildcards: sorted(config["datasets"][wildcards.dataset]["tasks"]),
        seed=config["seed"],
    script:
        "../workflow_scripts/select_samples.py"
