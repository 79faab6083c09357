"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): any-resolution tiles and a Qwen2 decoder.

Written for `llava-hf/llava-onevision-qwen2-7b-ov-hf` (and the 0.5b / 72b variants). As LLaVA-NeXT: the image is
seen as a base view (the whole image resized to the tower's square) plus the tiles of the best-fitting grid
pinpoint, each through the SigLIP tower (no [CLS]: every patch is a feature) and the projector; the tile features
are unpadded to the image's aspect ratio (and shrunk when they exceed `vision_aspect_ratio`'s tile budget) with an
`image_newline` embedding after every row. All of it sits at `<image>` token positions, base view first. The
processor passes `image_sizes` and `batch_num_images` (images per prompt: one image is tiled, several are not),
which the model's forward needs. The prompt is the processor's chat template. Gaussian noise is applied to the
projector's output (base view and tiles, before the newline embeddings are added).
"""

from __future__ import annotations

from typing import ClassVar

from transformers import LlavaOnevisionForConditionalGeneration

from notice.adapters.llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_class: ClassVar[type] = LlavaOnevisionForConditionalGeneration

    def leading_image_tokens(self) -> int:
        return 0  # SigLIP has no [CLS]: every image token is a patch
