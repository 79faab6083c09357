"""What the tiny offline builders share: a word-level tokenizer over the demo's words and the chat templates'
words, and the size fields of a tiny transformer config.

Every tiny builder (`notice.testing.tiny_<family>`, named by the family table) returns a random model and its
processor, built from configs without a download, which save with `save_pretrained` and load back like the
real checkpoints (`AutoConfig`, the model class, `notice.adapters.processors.load_processor`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from notice.demo.toy_config import ToyModelConfig
from notice.demo.toy_family import build_vocabulary

# Every word of the synthetic questions and of the chat templates (lowercased: the normaliser
# lowercases), plus the punctuation the Whitespace pre-tokenizer splits off words.
WORDS: tuple[str, ...] = tuple(
    sorted(
        set(build_vocabulary(()))  # the demo toys' words
        | {
            "red",
            "green",
            "blue",
            "yellow",
            "purple",
            "circle",
            "square",
            "triangle",
            "cross",
            "object",
            "shape",
            "colour",
            "is",
            "the",
            "or",
            "what",
            "answer",
            "with",
            "one",
            "word",
            "user",
            "assistant",
            "system",
            "you",
            "are",
            "a",
            "helpful",
            "?",
            ".",
            ":",
            ",",
        }
    )
)


def tiny_layers(hidden: int, layers: int, heads: int) -> dict[str, Any]:
    """The size fields of a tiny transformer config (vision tower or language model), MLP twice as wide."""
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads)


def word_tokenizer(
    specials: Sequence[str],
    unk_token: str,
    bos_token: str | None = None,
    added: Sequence[str] = (),
    **special_tokens: str | Mapping[str, str],
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `specials` + `added` + WORDS: every word and option is one token.

    Saved as a generic `PreTrainedTokenizerFast` because the families' own tokenizer classes rebuild a BPE
    model from the vocabulary on load. Whitespace, newlines included, gives no token. `bos_token` is
    prepended to every encoding, as the decoder language models' tokenizers do.
    """
    vocab = {tok: i for i, tok in enumerate([*specials, *added, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk_token))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tok.add_tokens([AddedToken(t, normalized=False) for t in added])
    if bos_token is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", special_tokens=[(bos_token, vocab[bos_token])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=unk_token,
        bos_token=bos_token,
        # Left padding keeps the answer position at -1 in batches (as the decoder families' processors do).
        padding_side="left",
        **special_tokens,
    )


# The demo toys' architecture at the tests' size (the rest of ToyModelConfig's defaults: 4 text heads, 2
# key/value heads).
SMALL_TOY: dict[str, Any] = dict(
    image_size=32,
    patch_size=8,
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    vision_intermediate=64,
    text_hidden=32,
    text_intermediate=64,
)


def small_toy_config(seed: int = 0, **overrides: Any) -> ToyModelConfig:
    """A demo toy's architecture at the tests' size (`SMALL_TOY`), `overrides` on top."""
    return ToyModelConfig(**{**SMALL_TOY, "seed": seed, **overrides})
