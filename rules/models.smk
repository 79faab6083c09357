# Toy models trained from scratch on the synthetic dataset (the embedded default).


rule train_toy_model:
    output:
        directory(f"{RESOURCES}/models/{{model}}"),
    params:
        train=lambda wildcards: config["models"][wildcards.model]["train"],
        dataset=lambda wildcards: config["datasets"][
            config["models"][wildcards.model]["train"]["dataset"]
        ],
    threads: 1024  # locally capped at --cores (all of them); profiles/slurm sets a count for clusters
    log:
        f"{RESULTS}/logs/train_toy_model/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_toy_model/{{model}}.tsv"
    script:
        "../workflow_scripts/train_toy_model.py"
