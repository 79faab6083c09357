# Toy models trained from scratch on the synthetic dataset (the embedded default).


rule train_toy_model:
    output:
        directory(f"{RESOURCES}/models/{{model}}"),
    log:
        f"{RESULTS}/logs/train_toy_model/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_toy_model/{{model}}.tsv"
    conda:
        "../envs/notice.yaml"
    # Training uses one torch thread whatever the machine (notice.demo.toy_models.train: more threads sum floats
    # in another order and train another model), so a job takes one core; the two toy models train side by side.
    threads: 1
    params:
        # Not the dataset's name: only its image size (below) is trained at.
        train=lambda wildcards: {k: v for k, v in config["models"][wildcards.model]["train"].items() if k != "dataset"},
        # Only the image size of the training dataset: the toy models learn their own built-in questions, so
        # the dataset's other settings (scenes, thresholds, templates) must not retrain them.
        image_size=lambda wildcards: training_image_size(config["models"][wildcards.model]["train"]),
    script:
        "../workflow_scripts/train_toy_model.py"
