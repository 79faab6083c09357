# Datasets -> samples table + image pool (the SIP corrupt images).


rule synthetic_dataset:
    output:
        samples=f"{RESOURCES}/datasets/{{dataset}}/samples.parquet",
        pool=f"{RESOURCES}/datasets/{{dataset}}/image_pool.parquet",
    log:
        f"{RESULTS}/logs/synthetic_dataset/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/synthetic_dataset/{{dataset}}.tsv"
    wildcard_constraints:
        dataset=kind_constraint("synthetic"),
    conda:
        "../envs/notice.yaml"
    params:
        # What the generator reads: not questions or distractor settings (they must not regenerate the images);
        # the tasks and their values as a set (the generator draws them in its own order).
        section=lambda wildcards: {
            **keys_of(dataset_section(wildcards), "n_scenes", "image_size"),
            "tasks": {
                task: {"values": sorted(spec["values"])} for task, spec in dataset_section(wildcards)["tasks"].items()
            },
        },
        seed=config["seed"],
        out_dir=lambda wildcards: dataset_dir(wildcards.dataset),
    script:
        "../workflow_scripts/synthetic_dataset.py"
