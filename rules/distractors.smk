# Distractors (the incorrect option of every question), filtered by word-vector similarity.


rule distractors:
    input:
        samples=samples_table,
        pool=image_pool,  # a candidate without a pool image for the sample could give no SIP pair
    output:
        distractors=f"{RESULTS}/datasets/{{dataset}}/distractors.parquet",
        rejections=f"{RESULTS}/datasets/{{dataset}}/distractor_rejections.parquet",
        exclusions=f"{RESULTS}/datasets/{{dataset}}/distractor_exclusions.parquet",
    log:
        f"{RESULTS}/logs/distractors/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/distractors/{{dataset}}.tsv"
    conda:
        "../envs/notice.yaml"
    params:
        section=lambda wildcards: {
            **keys_of(dataset_section(wildcards), "distractors"),
            "tasks": task_settings("values", "groups", "distractor_rule")(wildcards),
        },
        seed=config["seed"],
    script:
        "../workflow_scripts/distractors.py"
