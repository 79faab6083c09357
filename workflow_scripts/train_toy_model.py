"""Train a toy VLM from scratch on the synthetic data and save it like a hub model (rule `train_toy_model`)."""

from notice.demo.toy_config import configs_from_settings
from notice.demo.toy_models import train
from notice.workflow.runtime import logged

with logged(snakemake.log[0]) as log:
    settings = snakemake.params.train
    model_cfg, train_cfg = configs_from_settings(settings, snakemake.params.image_size)
    metrics = train(settings["family"], model_cfg, snakemake.output[0], train_cfg)
    log.info("training metrics: %s", metrics)
