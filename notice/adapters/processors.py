"""Load a model directory's processor on a machine without torchvision.

In transformers 5 every video processor needs torchvision, and a processor whose class takes a
`video_processor` cannot even be constructed without one: the class check in
`ProcessorMixin.__init__` looks the name up in a torchvision-only mapping and fails with
`'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'`. The workflow only feeds images, so
the fallback here builds the same processor class without its video parts; image processors fall
back to their PIL backend by themselves (`AutoImageProcessor`).
"""

from __future__ import annotations

import functools
import json
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


def _processor_class(source: str) -> type[ProcessorMixin]:
    """The processor class a directory names (as AutoProcessor finds it), else its model type's."""
    for name in _PROCESSOR_CLASS_FILES:
        path = Path(source, name)
        if path.is_file() and (class_name := json.loads(path.read_text()).get("processor_class")):
            return getattr(transformers, class_name)
    model_type = AutoConfig.from_pretrained(source, local_files_only=True).model_type
    return getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])


def load_processor(source: str) -> ProcessorMixin:
    """The processor of the local model directory `source` (already resolved; nothing is downloaded).

    AutoProcessor first, so a machine with torchvision gets exactly what transformers gives; only if
    it fails, the directory's processor class without video sub-processors (`image_only`).
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
