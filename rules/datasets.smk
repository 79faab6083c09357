# Datasets -> samples table + image pool (the SIP corrupt images).


rule synthetic_dataset:
    output:
        samples=f"{RESOURCES}/datasets/{{dataset}}/samples.parquet",
        pool=f"{RESOURCES}/datasets/{{dataset}}/image_pool.parquet",
    wildcard_constraints:
        dataset=kind_constraint("synthetic"),
    params:
        # Without the distractor settings: changing them must not regenerate the images.
        section=lambda wildcards: {k: v for k, v in dataset_section(wildcards).items() if k != "distractors"},
        seed=config["seed"],
        out_dir=lambda wildcards: dataset_dir(wildcards.dataset),
    log:
        f"{RESULTS}/logs/synthetic_dataset/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/synthetic_dataset/{{dataset}}.tsv"
    script:
        "../workflow_scripts/synthetic_dataset.py"
