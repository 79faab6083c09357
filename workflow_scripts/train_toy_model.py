"""Train a toy VLM from scratch on the synthetic data and save it like a hub model (rule `train_toy_model`)."""

import dataclasses

from notice.runtime import logged, set_threads
from notice.toy_models import ToyModelConfig, TrainConfig, train

with logged(snakemake.log[0]) as log:
    set_threads(snakemake.threads)
    settings, dataset = snakemake.params.train, snakemake.params.dataset
    model_cfg = ToyModelConfig(image_size=dataset.get("image_size", 64), seed=settings.get("seed", 0))
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    train_cfg = TrainConfig(**{key: value for key, value in settings.items() if key in known})
    metrics = train(settings["family"], model_cfg, snakemake.output[0], train_cfg)
    log.info("training metrics: %s", metrics)
