"""What every workflow script needs around the science: logging, device choice, model loading."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:  # the adapters import torch: jobs that only read and write tables start faster without it
    from notice.adapters.base import VLMAdapter


@contextlib.contextmanager
def logged(log_path: str | os.PathLike) -> Iterator[logging.Logger]:
    """Send stdout, stderr and `logging` of a workflow job to its Snakemake log file.

    An exception is logged with its traceback before it propagates, so the log says why a job failed.
    """
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with (
        open(log_path, "w", buffering=1) as stream,
        contextlib.redirect_stdout(stream),
        contextlib.redirect_stderr(stream),
    ):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            yield logging.getLogger("notice")
        except BaseException:
            logging.getLogger("notice").exception("job failed")
            raise
        finally:
            root.removeHandler(handler)


def resolve_device(spec: str = "auto") -> str:
    """The torch device of a GPU job for the model section's `device` value.

    `auto` is the GPU this job holds (`notice.workflow.gpu.job_device`: a local lease, or under SLURM the
    scheduler's CUDA_VISIBLE_DEVICES), else the CPU. Call it only in jobs with `resources: gpu=1`.
    """
    if spec == "auto":
        from notice.workflow.gpu import job_device

        return job_device()
    import torch  # here, not at the top: jobs that only read and write tables start faster without it

    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"config asks for device {spec!r} but torch sees no CUDA device")
    return spec


def load_model(model_path: str, section: dict):
    """The model's adapter, loaded with the device, dtype, prompt template and adapter of its config section.

    Call it only in jobs with `resources: gpu=1` (the device may be a leased GPU).
    """
    from notice.adapters.loading import load_adapter

    return load_adapter(
        model_path,
        device=resolve_device(section["device"]),
        dtype=section["dtype"],
        prompt_template=section["prompt_template"],
        adapter=section.get("adapter"),  # no default in the schema: absent is the model type's own adapter
    )


def load_tokenizing_model(model_path: str, section: dict):
    """The model's adapter without weights, for jobs without a GPU that format and tokenise prompts.

    Takes no GPU and almost no memory (a 7B model's weights would need 14 GB just to tokenise).
    """
    from notice.adapters.loading import load_adapter

    return load_adapter(
        model_path, prompt_template=section["prompt_template"], weights=False, adapter=section.get("adapter")
    )


# The float32 model audits on the job's GPU when its weights take at most this share of the free memory there
# (the rest is for one pair's activations); else on the CPU.
FIT_FRACTION = 0.9


def fitting_device(device: str, need_bytes: int, free_bytes: int) -> tuple[str, str]:
    """(device, where in words) of a float32 model of `need_bytes` on `device` with `free_bytes` free."""
    if need_bytes <= FIT_FRACTION * free_bytes:
        return device, device
    return "cpu", (
        f"cpu (the float32 model, {need_bytes / 1e9:.1f} GB, does not fit in the {free_bytes / 1e9:.1f} GB "
        f"free on {device})"
    )


def audit_device(model_path: str, section: dict, setting: str) -> tuple[str, str]:
    """(device, where in words) of the precision audit's float32 model (`setting`: the config's
    `patching.precision_audit.device`): `cpu`, or under `auto` the job's device (the model section's `device`)
    if the float32 weights fit in its free memory (counted on the meta device: nothing is loaded), else the CPU.

    Call it only in jobs with `resources: gpu=1`, like `load_model`.
    """
    if setting == "cpu":
        return "cpu", "cpu (patching.precision_audit.device)"
    device = resolve_device(section["device"])
    if not device.startswith("cuda"):
        return device, device
    import torch

    free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
    weights = load_tokenizing_model(model_path, section).model.parameters()
    return fitting_device(device, 4 * sum(parameter.numel() for parameter in weights), free_bytes)


def load_float32_model(model_path: str, section: dict, setting: str) -> tuple[VLMAdapter, str]:
    """(the model of `section` loaded in float32 where `audit_device` puts it, where in words): the precision
    audit's reference."""
    device, where = audit_device(model_path, section, setting)
    return load_model(model_path, {**section, "dtype": "float32", "device": device}), where


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Decode an image as RGB, naming the file when it cannot be read or is too large.

    An image of more than `max_pixels` pixels (None: notice.data.download.MAX_IMAGE_PIXELS, the
    downloader's default and most) is refused from its header before decoding, so one huge file
    cannot exhaust a model job's memory; the ValueError names the file and the limit for callers.
    """
    from notice.data.download import MAX_IMAGE_PIXELS, ImageTooLarge, open_image  # only load_image needs them

    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with open_image(path, limit) as image:
            return image.convert("RGB")
    except ImageTooLarge as error:
        raise ValueError(f"{path}: {error} (notice.workflow.runtime.load_image's limit)") from error
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path}: cannot decode image ({error})") from error


def set_threads(n: int) -> None:
    """Use the cores Snakemake gave the job, no more (jobs run side by side)."""
    import torch

    torch.set_num_threads(max(1, n))
    print(f"torch threads: {torch.get_num_threads()}", file=sys.stderr)
