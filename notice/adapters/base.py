"""The model-adapter interface: everything the method needs to know about one architecture family.

Patching engines, evaluation and analysis talk to models only through this interface, so adding a
family means adding one adapter, never `if model == ...` branches elsewhere.

Sites (docs/method.md, §5 "Sites"), all at one token position of the text stream:
- ``mlp``: the MLP's output before it is added to the residual stream;
- ``self_attn`` / ``cross_attn``: the concatenated per-head attention outputs, i.e. the *input* of the
  attention block's output projection;
- ``self_attn_head`` / ``cross_attn_head``: one head's slice ``[h*d:(h+1)*d]`` of that same input;
- ``layer``: the layer's output (residual stream after the layer).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast

import numpy as np
import torch
from PIL import Image

from notice.adapters.attention_taps import AttentionTap
from notice.families import family_of

HEAD_SITE_PARENT = {"self_attn_head": "self_attn", "cross_attn_head": "cross_attn"}
HALF_PRECISION = (torch.float16, torch.bfloat16)


def float32_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of `module` without gradients and without the forward hooks it carries now (deepcopy copies
    them: an engine's or a test's hook on the original must not fire in the copy)."""
    duplicate = copy.deepcopy(module).float().requires_grad_(False)
    for sub in duplicate.modules():  # torch has no public call that drops every hook of a module
        for hooks in (sub._forward_hooks, sub._forward_hooks_with_kwargs, sub._forward_hooks_always_called):
            hooks.clear()
        for hooks in (sub._forward_pre_hooks, sub._forward_pre_hooks_with_kwargs):
            hooks.clear()
    return duplicate


@contextmanager
def hook_while_active(module: torch.nn.Module, hook: Callable[..., Any]) -> Iterator[None]:
    """While active, `hook` is a forward hook of `module`."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def pre_hook_while_active(module: torch.nn.Module, hook: Callable[..., Any]) -> Iterator[None]:
    """While active, `hook(module, args, kwargs) -> (args, kwargs)` is a forward pre-hook of `module`."""
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True, order=True)
class Patch:
    """One patched run: copy the clean activation of `site` at (`layer`, `position`[, `head`])."""

    site: str
    layer: int
    position: int
    head: int = -1


@dataclass
class ModelInput:
    """One prompt with one image, tokenised by the model's own processor and on the model's device.

    `extra` holds every other tensor the processor returned (`image_grid_thw`, `image_sizes`,
    `pixel_attention_mask`, `token_type_ids`, ...), passed to the model's forward as they are.
    """

    input_ids: torch.Tensor  # [1, T]
    attention_mask: torch.Tensor  # [1, T]
    pixel_values: torch.Tensor  # as the processor gives it ([1, C, H, W], tiles, or flattened patches)
    tokens: list[str]  # one display string per position of input_ids
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the model's forward for this input."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pixel_values": self.pixel_values,
            **self.extra,
        }


def model_input(encoding: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype) -> ModelInput:
    """A ModelInput from a processor's output (`return_tensors="pt"`), floats cast to the model's dtype."""
    tensors = {
        k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
        for k, v in encoding.items()
        if isinstance(v, torch.Tensor)
    }
    input_ids = tensors.pop("input_ids")
    return ModelInput(
        input_ids=input_ids,
        attention_mask=tensors.pop("attention_mask", torch.ones_like(input_ids)),
        pixel_values=tensors.pop("pixel_values"),
        tokens=tokenizer.convert_ids_to_tokens(input_ids[0].tolist()),
        extra=tensors,
    )


@dataclass(frozen=True)
class ImageGrid:
    """Where one image's patches sit among the keys of the fusion attention.

    `keys[i]` is the key index of patch i, patches in row-major order on a `rows` × `cols` grid
    that covers the whole image as the model sees it (`VLMAdapter.model_view`).
    """

    keys: tuple[int, ...]
    rows: int
    cols: int


def overlapping_cells(mask: np.ndarray, rows: int, cols: int) -> list[int]:
    """Row-major indices of the cells of a `rows` × `cols` grid laid over `mask` [H, W] that hold a pixel above
    0.5 (cell edges at round(i·H/rows), round(j·W/cols))."""
    height, width = mask.shape
    row_edges = np.round(np.linspace(0, height, rows + 1)).astype(int)
    col_edges = np.round(np.linspace(0, width, cols + 1)).astype(int)
    return [
        r * cols + c
        for r in range(rows)
        for c in range(cols)
        if (mask[row_edges[r] : row_edges[r + 1], col_edges[c] : col_edges[c + 1]] > 0.5).any()
    ]


def without_added_bos(prompt: str, tokenizer: Any) -> str:
    """`prompt` without its leading BOS text when `tokenizer` adds a BOS to whatever it encodes."""
    bos = tokenizer.bos_token
    if not bos or not prompt.startswith(bos):
        return prompt
    added = tokenizer("a")["input_ids"]
    adds_bos = (
        len(added) > len(tokenizer("a", add_special_tokens=False)["input_ids"]) and added[0] == tokenizer.bos_token_id
    )
    return prompt.removeprefix(bos) if adds_bos else prompt


class VLMAdapter(ABC):
    """One architecture family: the only place that knows the family's modules, inputs and rules.

    Engines, evaluation, the attention stage and analysis ask the adapter; nothing else names a family. Which
    model types an adapter takes and which engine patches it fast is its row of the family table
    (notice.families).
    """

    model_class: ClassVar[type[Any]]  # transformers class that `from_pretrained` loads
    # "{question}" is replaced by the question; None: the processor's chat template with an image
    # and the question as the user's turn, and the generation prompt.
    default_prompt_template: ClassVar[str | None]

    def __init__(self, model: torch.nn.Module, processor, prompt_template: str | None = None):
        # A transformers model: adapters reach its submodules and config by family-specific attribute
        # names, which torch's `Module.__getattr__` types as `Tensor | Module`; the accessors type what they return.
        self.model: Any = model.eval()
        self.processor = processor
        self.prompt_template = prompt_template or self.default_prompt_template or self.chat_prompt_template()

    @property
    def family(self) -> str:
        """The family table's name of this adapter (notice.families); the class name for one outside the table."""
        row = family_of(type(self))
        return row.name if row is not None else type(self).__name__

    # -- architecture -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    @abstractmethod
    def n_layers(self) -> int:
        """Layers of the stream that is patched (a text encoder, or a decoder language model)."""

    @property
    @abstractmethod
    def n_heads(self) -> int:
        """Query heads of the fusion attention (cross-attention to the image, or a decoder's self-attention)."""

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    module_sites: ClassVar[tuple[str, ...]]  # module-wise sites, e.g. ("mlp", "self_attn", "cross_attn")
    head_site: ClassVar[str]  # "cross_attn_head" or "self_attn_head"

    def layer_sites(self, layer: int) -> tuple[str, ...]:
        """The module sites `layer` has: every one of `module_sites`, unless the family's layers differ in kind
        (e.g. cross-attention layers between self-attention layers)."""
        return self.module_sites

    def layer_head_site(self, layer: int) -> str:
        """The head site patched at `layer`: `head_site`, unless the family's layers differ in kind."""
        return self.head_site

    def site_width(self, site: str) -> int:
        """Width of the activation at `site` (a head site: one head's slice)."""
        if site in HEAD_SITE_PARENT:
            return self.head_dim
        first = next((layer for layer in range(self.n_layers) if site in self.layer_sites(layer)), 0)
        module, kind = self.site_module(site, first)
        if kind == "input":
            return cast(torch.nn.Linear, module).in_features  # an output projection
        return self.hidden_size

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of the patched stream's residual stream (and of `mlp` and `layer`)."""

    # -- inputs -----------------------------------------------------------------------------
    def format_prompt(self, question: str) -> str:
        return self.prompt_template.replace("{question}", question)

    def chat_prompt_template(self) -> str:
        """The processor's chat template for one image and the question, with the generation prompt, less the
        leading BOS where the tokenizer adds one to every prompt itself (as transformers' own tokenizing
        `apply_chat_template` gives: one BOS, not two)."""
        return without_added_bos(self.rendered_chat_template(), self.processor.tokenizer)

    def rendered_chat_template(self) -> str:
        """The processor's chat template rendered for one image and the question, with the generation prompt."""
        template = getattr(self.processor, "chat_template", None)
        if not template:
            raise ValueError(
                f"{type(self).__name__}: the processor has no chat template; give the model a prompt_template "
                "with {question} in the config"
            )
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{question}"}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def prepare(self, image: Image.Image, prompt: str) -> ModelInput:
        """Tokenise `prompt` and preprocess `image` exactly as the model's processor does."""
        encoding = self.processor(images=image, text=prompt, return_tensors="pt")
        return model_input(encoding, self.processor.tokenizer, self.device, self.dtype)

    @abstractmethod
    def option_token_id(self, option: str) -> int:
        """First token of `option` as the model would produce it as an answer."""

    @abstractmethod
    def patch_positions(self, inp: ModelInput) -> list[int]:
        """Positions patched module-wise (every text position; image tokens are not patched)."""

    @abstractmethod
    def head_position(self, inp: ModelInput, answer_token_id: int) -> int:
        """Position for head patching (e.g. the correct-answer token in the question, or the last token)."""

    # -- running ----------------------------------------------------------------------------
    @torch.no_grad()
    def answer_logits(self, inp: ModelInput) -> torch.Tensor:
        """Logits [vocab] (float32) of the first answer token: what every metric is computed from."""
        return self.differentiable_answer_logits(inp)

    @abstractmethod
    def differentiable_answer_logits(self, inp: ModelInput) -> torch.Tensor:
        """`answer_logits` under the caller's autograd mode: the attribution screen backpropagates through it.
        Implementations run the model through `answer_logits_of`, so half precision scores in float32."""

    # -- the score head (docs/method.md, §6 "Precision") -------------------------------------
    @property
    def upcast_scores(self) -> bool:
        """True in half precision: the score head (final norm and unembedding) then runs in float32."""
        return self.dtype in HALF_PRECISION

    @abstractmethod
    def head_input_module(self) -> torch.nn.Module:
        """The module whose first positional input is the hidden state the answer logits are read from (the
        final norm, or the head itself); `final_logits` maps that input to the logits."""

    @abstractmethod
    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Answer logits [B, V] (float32) from the score head's input at the answer position [B, D], through
        `float32_module`s of the head's modules (in half precision the whole head runs in float32)."""

    def float32_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` itself in full precision; in half precision a float32 copy of it, made once and kept (the
        model's own weights upcast, so the score head adds no rounding of its own)."""
        if not self.upcast_scores:
            return module
        copies: dict[int, torch.nn.Module] = self.__dict__.setdefault("_float32_copies", {})
        if id(module) not in copies:
            copies[id(module)] = float32_copy(module)
        return copies[id(module)]

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """The score head's input as `final_logits` feeds it to `float32_module`s (float32 in half precision)."""
        return hidden.float() if self.upcast_scores else hidden

    def answer_logits_of(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Float32 answer logits of one forward pass: `forward()` runs the model and returns its own answer logits
        ([V], or [B, V] for a batch). In full precision those are the scores; in half precision they are
        recomputed by `final_logits` from the score head's input at the last position."""
        if not self.upcast_scores:
            return forward().float()
        seen: list[torch.Tensor] = []

        def record(_module: torch.nn.Module, args: tuple) -> None:
            if not args:
                raise RuntimeError(f"{type(_module).__name__} was called without a positional input to score")
            seen.append(args[0])

        handle = self.head_input_module().register_forward_pre_hook(record)
        try:
            own = forward()
        finally:
            handle.remove()
        return self.final_logits(seen[-1][:, -1]).reshape(own.shape)

    @abstractmethod
    def generate_answer(self, inp: ModelInput, max_new_tokens: int = 5) -> str:
        """Greedy answer string, for exact-match accuracy."""

    @abstractmethod
    def site_module(self, site: str, layer: int) -> tuple[torch.nn.Module, Literal["input", "output"]]:
        """The module whose input (first positional argument) or output *is* the site's activation.

        Head sites return their parent attention site's module; the head is a slice of it.
        """

    @abstractmethod
    def image_embedding_module(self) -> torch.nn.Module:
        """Module whose output holds the image embeddings the text side sees (Gaussian-noise target)."""

    # -- circuits (notice.circuits) ----------------------------------------------------------
    def attention_projections(self, site: str, layer: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        """The query, key and value projections of attention site `site` ("self_attn", "cross_attn") at `layer`:
        modules whose outputs [.., rows, heads·width] the attention reads, one column block per head (a
        cross-attention's keys and values are projections of the image)."""
        raise NotImplementedError(f"{self.family}: no attention projections, so no circuits")

    def residual_norms(self, layer: int) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        """(attention's pre-norm, MLP's pre-norm) of a layer that adds its output projection's and MLP's outputs to a
        residual stream as they are; None (every layer here): circuits then score edges by one forward per reader."""
        return None

    def circuit_input_modules(self) -> dict[str, list[torch.nn.Module]]:
        """The circuit graph's input nodes: "image", the modules whose outputs are all the image brings into the
        patched stream, and "text", those of the prompt's tokens (rows = stream positions where they line up)."""
        return {"image": [self.image_embedding_module()], "text": [self.model.get_input_embeddings()]}

    def attention_taps(self, tap: AttentionTap) -> AbstractContextManager[None]:
        """While active, every fusion-attention layer reports its queries, keys and probabilities to `tap`
        (notice.adapters.attention_taps); the attribution screen's query/key sites need it."""
        raise NotImplementedError(
            f"{self.family}: no attention taps, so no query/key sites in the attribution screen "
            "(screen other sites, or give the adapter `attention_taps`)"
        )

    # -- how the image enters (notice.flow) ------------------------------------------------------
    def image_key_states(self, edit: Callable[[torch.Tensor], torch.Tensor]) -> AbstractContextManager[None]:
        """While active, the image as the fusion attention's keys read it passes through `edit`: a tensor
        [B, N, D] whose row k is image key k of `image_grid` (token fusion: the language model's input embeddings,
        one row per position; cross-attention: the image embeddings the text side attends to). `edit` returns a
        tensor of the same shape (the object-token ablation replaces rows of it)."""
        raise NotImplementedError(f"{self.family}: the adapter does not say where the image tokens enter the model")

    def stream_image_grid(self, inp: ModelInput) -> ImageGrid:
        """The positions of the image tokens in the patched stream, on their grid, where the stream's residual is
        what the score head (`final_logits`) reads at its end: the logit lens's positions. NotImplementedError
        where the image reaches the stream only through cross-attention."""
        raise NotImplementedError(
            f"{self.family}: the image reaches the patched stream through cross-attention, so the stream has no "
            "residual at image positions (and its output is not read by an unembedding): no logit lens on image tokens"
        )

    # -- fusion attention (head functions) ----------------------------------------------------
    @abstractmethod
    def fusion_attention_modules(self) -> list[torch.nn.Module]:
        """Per layer, the fusion attention module; its output[1] is the probabilities [B, H, T, K]."""

    def fusion_layers(self) -> list[int]:
        """The layer of each module of `fusion_attention_modules`: every layer, unless only some layers attend to
        the image."""
        return list(range(len(self.fusion_attention_modules())))

    @abstractmethod
    def image_grid(self, inp: ModelInput) -> ImageGrid:
        """The key indices of the image patches scored for head functions, and their grid."""

    @abstractmethod
    def attention_queries(self, inp: ModelInput) -> list[int]:
        """Default query positions of the attention stage (positions that can see the image)."""

    def model_view(self, inp: ModelInput) -> np.ndarray:
        """The image as the model sees it (after resize / crop), uint8 [H, W, 3]: the processor's
        normalisation undone, so overlays line up with the patch grid exactly."""
        return self.pixels_view(inp.pixel_values[0])

    def pixels_view(self, pixels: torch.Tensor) -> np.ndarray:
        """Normalised pixels [3, H, W] as the processor made them, back to uint8 [H, W, 3]."""
        processor = self.processor.image_processor
        mean = torch.tensor(processor.image_mean).view(3, 1, 1)
        std = torch.tensor(processor.image_std).view(3, 1, 1)
        image = pixels.float().cpu() * std + mean
        return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()

    def mask_view(self, mask: Image.Image, inp: ModelInput) -> np.ndarray:
        """An object mask (0/255) through the same resize / crop as the image, float [H, W] in [0, 1].

        Pixels count as object above 0.5, so interpolated edges (and a processor's padding with the
        mean colour, ~0.46) do not.
        """
        out = self.processor.image_processor(images=mask.convert("RGB"), return_tensors="pt", do_normalize=False)
        return (out["pixel_values"][0].float().mean(0) > 0.5).float().numpy()

    def edited_output(
        self, module: torch.nn.Module, edit: Callable[[torch.Tensor], torch.Tensor], first_row: int = 0
    ) -> AbstractContextManager[None]:
        """While active, rows `first_row`.. (dim 1) of the module's main output pass through `edit`."""

        def rows_edited(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:, :first_row], edit(x[:, first_row:])], dim=1) if first_row else edit(x)

        return hook_while_active(module, lambda _m, _a, output: self.replace_output_tensor(output, rows_edited))

    # -- attention knockout (notice.flow) -----------------------------------------------------
    # How the fast knockout engine runs this family: "suffix" (a causal or prefix-LM decoder: rows recompute the
    # positions a block can change, from the window's first layer, against the clean run's cached states) or
    # "batched" (rows are one batched forward of `batched_answer_logits`).
    knockout_engine: ClassVar[Literal["suffix", "batched"]] = "batched"
    # True when the image's keys in the fusion attention are positions of the stream (token fusion); False when
    # they are a cross-attention's keys.
    image_keys_are_positions: ClassVar[bool] = True

    def stream_positions(self, inp: ModelInput) -> list[int]:
        """Positions of the patched stream's sequence (its queries)."""
        return list(range(inp.input_ids.shape[1]))

    def image_keys(self, inp: ModelInput) -> list[int]:
        """Every key of the image in the fusion attention: positions (token fusion) or cross-attention keys."""
        raise NotImplementedError(f"{self.family}: no image keys, so no token groups")

    def question_positions(self, inp: ModelInput, question: str) -> list[int]:
        """The question's own tokens inside the prompt: the last place where its tokenisation (as written, or
        after a space) occurs in `inp.input_ids`; failing that, where all but its first token occur right after a
        token that is the question's start as the prompt tokenised it (sentencepiece writes "Is" after a newline
        but "▁Is" alone). ValueError if the question is nowhere."""
        tokenizer = self.processor.tokenizer
        ids = inp.input_ids[0].tolist()
        candidates = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (question, " " + question)]
        for wanted in candidates:
            starts = [s for s in range(len(ids) - len(wanted) + 1) if wanted and ids[s : s + len(wanted)] == wanted]
            if starts:
                return list(range(starts[-1], starts[-1] + len(wanted)))
        for wanted in candidates:
            tail = wanted[1:]
            starts = [
                s
                for s in range(1, len(ids) - len(tail) + 1)
                if tail
                and ids[s : s + len(tail)] == tail
                and (head := tokenizer.decode([ids[s - 1]]).strip())
                and question.lstrip().startswith(head)
            ]
            if starts:
                return list(range(starts[-1] - 1, starts[-1] + len(tail)))
        raise ValueError(
            f"{self.family}: the question {question!r} ({tokenizer.tokenize(question)}) is not a token run of the "
            f"prompt {inp.tokens}"
        )

    def answer_position(self, inp: ModelInput) -> int | None:
        """The stream position the answer is read at; None when no single position is (e.g. a decoder reading
        every position of a text encoder)."""
        raise NotImplementedError(f"{self.family}: no answer position, so no token groups")

    def object_keys(self, inp: ModelInput, object_mask: np.ndarray) -> list[int]:
        """The image keys whose patch of `image_grid` overlaps the object (`object_mask` float [H, W] in [0, 1] over
        `model_view`, as `mask_view` gives it; a patch overlaps where any of its pixels is above 0.5)."""
        grid = self.image_grid(inp)
        cells = overlapping_cells(object_mask, grid.rows, grid.cols)
        return sorted(grid.keys[cell] for cell in cells)

    def attention_blocks(
        self, self_blocks: dict[int, torch.Tensor], fusion_blocks: dict[int, torch.Tensor]
    ) -> AbstractContextManager[None]:
        """While active, the stream's attention at layer l blocks `self_blocks[l]` (bool [B, T, T] over stream
        positions) and its fusion attention `fusion_blocks[l]` (bool [B, T, K] over image keys; token fusion:
        given in `self_blocks`), as notice.adapters.attention_blocks does."""
        raise NotImplementedError(f"{self.family}: no attention blocks, so no attention knockout")

    def batched_answer_logits(self, inp: ModelInput, rows: int) -> torch.Tensor:
        """Answer logits [rows, V] (float32) of `rows` copies of `inp` in one batched forward (under
        `attention_blocks`, each row its own blocks): the "batched" knockout engine's forward."""
        raise NotImplementedError(f"{self.family}: no batched forward for the knockout engine")

    @staticmethod
    def replace_output_tensor(output, fn: Callable[[torch.Tensor], torch.Tensor]):
        """Apply `fn` to the main tensor of a module output (tensor, tuple or ModelOutput)."""
        if isinstance(output, torch.Tensor):
            return fn(output)
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        key = next(iter(output.keys()))
        output[key] = fn(output[key])
        return output
