"""What the tiny Qwen-tokenizer builders share: the chat template of the Qwen VL checkpoints and their stop tokens.

Qwen2-VL, Qwen3-VL and Qwen3.5 write the same chatml turns with the image in place (`<|vision_start|>
<|image_pad|><|vision_end|>`); they differ in a default system turn (Qwen2-VL) and the empty thinking block of
Qwen3.5's non-thinking answer prompt. Every Qwen-tokenizer checkpoint (InternVL 3 and LLaVA-OneVision too) stops
at `<|im_end|>` or `<|endoftext|>` and pads with `<|endoftext|>`.
"""

from __future__ import annotations

from collections.abc import Mapping

from transformers import PreTrainedModel

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def qwen_chat_template(system: str | None = None, thinking_switch: bool = False) -> str:
    """The Qwen VL chat template, short: `system` as the default system turn when the conversation has none,
    images and videos in place, and the generation prompt; with `thinking_switch`, the generation prompt opens a
    thinking block, or writes an empty one when `enable_thinking` is false (Qwen3.5's non-thinking prompt)."""
    default_system = (
        f"{{% if loop.first and message['role'] != 'system' %}}<|im_start|>system\n{system}<|im_end|>\n{{% endif %}}"
        if system is not None
        else ""
    )
    generation = (
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
        "{% else %}<think>\n{% endif %}{% endif %}"
        if thinking_switch
        else "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return (
        "{% for message in messages %}"
        f"{default_system}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for content in message['content'] %}"
        f"{{% if content['type'] == 'image' %}}{IMAGE}"
        f"{{% elif content['type'] == 'video' %}}{VIDEO}"
        "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}" + generation
    )


def stop_at_qwen_end_tokens(model: PreTrainedModel, ids: Mapping[str, int]) -> None:
    """Generation stops at `<|im_end|>` or `<|endoftext|>` and pads with `<|endoftext|>` (`ids`: token → id)."""
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
