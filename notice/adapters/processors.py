"""Load a model directory's processor on a machine without torchvision.

In transformers 5 every video processor needs torchvision, and a processor whose class takes a
`video_processor` cannot even be constructed without one: the class check in
`ProcessorMixin.__init__` looks the name up in a torchvision-only mapping and fails with
`'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'`. The workflow only feeds images, so
the fallback here builds the same processor class without its video parts; image processors fall
back to their PIL backend by themselves (`AutoImageProcessor`). A processor module that imports its
model's torchvision image processor (for a helper its PIL twin has too) is imported with the PIL twin
standing in (`processor_class`).
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from pathlib import Path

import transformers
from transformers import AutoConfig, AutoProcessor
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.processing_utils import ProcessorMixin

# Files that name the processor class, in the order AutoProcessor reads them.
_PROCESSOR_CLASS_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


@functools.cache
def image_only(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`cls` without its video sub-processors: same name, same behaviour on images and text.

    `ProcessorMixin` takes its sub-processors from `get_attributes()` (construction, loading and
    saving alike); with the video ones left out, the class's own `__init__` may still pass
    `video_processor=None` positionally, and `ProcessorMixin.__init__` drops it. Loading passes None
    for the video sub-processors, as a class may require them (some have no default). The subclass
    keeps the class name, so save_pretrained records the real class (`processor_class`); pickle
    therefore cannot find it by name (copy.deepcopy works). Cached: one subclass per class.
    """
    attributes = [name for name in cls.get_attributes() if "video" not in name]
    videos = dict.fromkeys(name for name in cls.get_attributes() if "video" in name)

    def from_args_and_dict(subclass, args, processor_dict, **kwargs):
        return cls.from_args_and_dict.__func__(subclass, args, {**videos, **processor_dict}, **kwargs)

    return type(
        cls.__name__,
        (cls,),
        {
            "__module__": cls.__module__,
            "get_attributes": classmethod(lambda _: attributes),
            "from_args_and_dict": classmethod(from_args_and_dict),
        },
    )


@functools.cache
def processor_class(name: str) -> type[ProcessorMixin]:
    """transformers' processor class `name`, also where its module imports the model's torchvision image processor.

    Without torchvision, transformers gives a placeholder for such a class (`processing_<model>` imports
    `image_processing_<model>`, which imports torchvision). Its module is then imported once with the PIL image
    processor module `image_processing_pil_<model>` standing in for the torchvision one (it defines the same
    helpers), and the class is that module's own: same code, same behaviour. ImportError if the PIL module lacks
    what the processor module imports. Cached: one class per name.
    """
    cls = getattr(transformers, name)
    if not getattr(cls, "is_dummy", False) or list(cls._backends) != ["torchvision"]:
        return cls  # the class, or a placeholder that names what else is missing when used
    package, _, module = cls.__module__.rpartition(".")
    model = module.removeprefix("processing_")
    torchvision_module = f"{package}.image_processing_{model}"
    sys.modules[torchvision_module] = importlib.import_module(f"{package}.image_processing_pil_{model}")
    try:
        return getattr(importlib.import_module(cls.__module__), name)
    finally:
        del sys.modules[torchvision_module]


def _processor_class(source: str) -> type[ProcessorMixin]:
    """The processor class a directory names (as AutoProcessor finds it), else its model type's."""
    for name in _PROCESSOR_CLASS_FILES:
        path = Path(source, name)
        if path.is_file() and (class_name := json.loads(path.read_text()).get("processor_class")):
            return processor_class(class_name)
    model_type = AutoConfig.from_pretrained(source, local_files_only=True).model_type
    return processor_class(PROCESSOR_MAPPING_NAMES[model_type])


def load_processor(source: str) -> ProcessorMixin:
    """The processor of the local model directory `source` (already resolved; nothing is downloaded).

    AutoProcessor first, so a machine with torchvision gets exactly what transformers gives; only if
    it fails, the directory's processor class (`processor_class`) without video sub-processors (`image_only`).
    """
    try:
        return AutoProcessor.from_pretrained(source, local_files_only=True)
    except Exception as auto_error:  # whatever failed, the image-only build may not; both errors are reported
        try:
            # type[X] is hashable; mypy says it is not (python/mypy#20409)
            cls = image_only(_processor_class(source))  # type: ignore[arg-type]
            return cls.from_pretrained(source, local_files_only=True)
        except Exception as fallback_error:
            raise RuntimeError(
                f"cannot load the processor of {source}: AutoProcessor failed ({type(auto_error).__name__}: "
                f"{auto_error}); the image-only processor failed too ({type(fallback_error).__name__}: "
                f"{fallback_error})"
            ) from fallback_error
