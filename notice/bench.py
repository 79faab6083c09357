"""`make bench`: cost per patched run of the fast engine against the two usual ways of patching.

For one sample per adapter family, on random-weight models built from configs (no downloads), it times:
- fast: `notice.patching.fast.patch_sample` on the paper's whole patch set (clean and corrupt runs,
  image encoder and every cache included), divided by the number of patched runs;
- (a) hooked: one hooked full forward per patched run, with the clean activations cached once
  (what a TransformerLens user writes; it is `reference.run_patched`);
- (b) 3-row: the published code's batch of (clean, corrupt, patched) rows recomputed for every patch.
(a) and (b) are timed on a seeded random subset of the patches; the engine's rows on that subset are
checked against (a)'s logits (relative error as in `fast.max_relative_error`).

Each family's layout (model sizes, prompt, image, patch set) lives in its own bench module,
`<adapter module>_bench` next to the adapter, found through the adapter registry (the family imports
of `notice.adapters.loading`), so adding a family never touches this file. A bench module exposes
`bench_case(real_size=False, *, family, tiny=False, device="cpu") -> Case`. Corruption: SIP (another
image, same prompt). The patch set is `reference.default_patches`.

For the layouts whose bench module sets `SCREEN_KEY_PREFIX` (`screen_prefixes`; when run) it also times the default
attribution screen (`notice.patching.attribution.attribution_estimates`, method atp: one clean forward,
one corrupt forward, one backward) on the same sample, against one forward (`answer_logits` of the
corrupt input; the ratio is the screen's cost in forward-equivalents), both the median of
`--screen-repeats` runs, and against exact patching of the screen's module and head sites: every
module site at every position, every head at every position (image positions included),
`screen_patches`. That set is far too large to run, so the fast engine runs a seeded random subset of
it (`--screen-patches`); exact time = its setup (clean and corrupt runs, timed alone) + the subset's
per-patch cost × the number of sites. The screen's image-embedding rows and query / key sites are not
counted (no engine patches them), so the ratio is a lower bound.

The last line printed is `bench: <family>_speedup=<x> ... max_rel_err=<e>` (speedup of the fast engine
over (a), one entry per family run), followed where screened by `<prefix>screen_forwards=<f>
<prefix>screen_speedup=<x>` (exact patching's extrapolated time over the screen's); every entry is
key=value.

`--real-size` builds the real checkpoints' dimensions (random weights, bfloat16, `--device`, a GPU by
default) and reports the fast engine's patched runs per second and the estimated wall time of the
paper's 500-sample experiment per corruption; (b) is skipped and (a) only gives the ratio.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import TYPE_CHECKING, Literal, TypeVar

import torch

from notice.adapters.base import ADAPTER_FAMILIES, HEAD_SITE_PARENT, ModelInput, Patch, VLMAdapter
from notice.adapters.decoder import DecoderVLMAdapter
from notice.method.metrics import result_row, scores
from notice.patching import fast, reference
from notice.patching.attribution import IMAGE_SITE, attribution_estimates, qk_sites, screen_sites

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PAPER_SAMPLES = 500  # samples per corruption in the paper's experiment
Size = Literal["tiny", "bench", "real"]
RowsLogits = Callable[..., torch.Tensor]  # (adapter, batched ModelInput) -> answer logits [B, V]
T = TypeVar("T")


def forward_rows_logits(adapter: DecoderVLMAdapter, inp: ModelInput) -> torch.Tensor:
    """Answer logits [B, V] of a batched input through the adapter's own forward (decoder families)."""
    return adapter.forward(inp).logits[:, -1].float()


@dataclass
class Case:
    """One sample of one family: the adapter, the (clean, corrupt) inputs, the answer tokens, the patches,
    and how (b) gets the answer logits of a batch of rows."""

    name: str
    adapter: VLMAdapter
    clean: ModelInput
    corrupt: ModelInput
    tau: int
    tau_p: int
    patches: list[Patch]
    description: str
    rows_logits: RowsLogits = forward_rows_logits


# -- helpers of the family bench modules ------------------------------------------------------------
def size_of(real_size: bool, tiny: bool) -> Size:
    """The size a family builds: the real checkpoint's, the bench's scaled one, or tiny (tests)."""
    if real_size and tiny:
        raise ValueError("real_size and tiny exclude each other")
    return "real" if real_size else "tiny" if tiny else "bench"


def build_model(model_cls: type[PreTrainedModel], config, size: Size, device: str) -> torch.nn.Module:
    """Random weights (seed 0), eager attention (the oracle's); bfloat16 at real size, else float32."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if size == "real" else torch.float32
    with torch.device(device):
        return model_cls._from_config(config, attn_implementation="eager", dtype=dtype).eval()


def random_ids(rng: random.Random, n: int, low: int, high: int) -> list[int]:
    return [rng.randrange(low, high) for _ in range(n)]


def sip_case(
    name: str,
    adapter: VLMAdapter,
    ids: list[int],
    pixel_shape: Sequence[int],
    tau: int,
    tau_p: int,
    description: str,
    extra: dict[str, torch.Tensor] | None = None,
    rows_logits: RowsLogits = forward_rows_logits,
) -> Case:
    """SIP sample: one prompt (`ids`, one sequence) with two seeded random images of `pixel_shape`;
    `extra` is the rest of the processor's output (the same for both images)."""
    device, dtype = adapter.device, adapter.dtype
    input_ids = torch.tensor([ids], device=device)
    on_device = {k: v.to(device) for k, v in (extra or {}).items()}

    def inp(seed: int) -> ModelInput:
        pixels = torch.randn(*pixel_shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
        return ModelInput(input_ids, torch.ones_like(input_ids), pixels, [f"#{i}" for i in ids], dict(on_device))

    clean, corrupt = inp(1), inp(2)
    return Case(
        name,
        adapter,
        clean,
        corrupt,
        tau,
        tau_p,
        reference.default_patches(adapter, clean, tau),
        description,
        rows_logits,
    )


def screen_prefixes() -> dict[str, str]:
    """Family -> bench-line key prefix of the layouts whose attribution screen is timed: those whose bench
    module sets `SCREEN_KEY_PREFIX` (e.g. "" gives `screen_speedup=`)."""
    return {
        family: module.SCREEN_KEY_PREFIX
        for family, module in bench_modules().items()
        if hasattr(module, "SCREEN_KEY_PREFIX")
    }


def bench_modules() -> dict[str, ModuleType]:
    """Family → its bench module, for every family in the adapter registry, opt-in ones included (in
    registration order)."""
    import notice.adapters.loading  # noqa: F401  (importing it registers every family's adapter)

    return {cls.family: importlib.import_module(f"{cls.__module__}_bench") for cls in ADAPTER_FAMILIES.values()}


# -- (b) the published method: a batch of (clean, corrupt, patched) rows per patch ---------------
def stack_rows(inputs: Sequence[ModelInput]) -> ModelInput:
    """One batch of single-sample inputs: every tensor concatenated along its first dimension (rows,
    tiles or flattened patches alike, as a processor batches them)."""
    first = inputs[0]
    return ModelInput(
        torch.cat([i.input_ids for i in inputs]),
        torch.cat([i.attention_mask for i in inputs]),
        torch.cat([i.pixel_values for i in inputs]),
        first.tokens,
        {key: torch.cat([i.extra[key] for i in inputs]) for key in first.extra},
    )


@torch.no_grad()
def three_row_patch(case: Case, patch: Patch) -> torch.Tensor:
    """Logits [V] of the patched row of one (clean, corrupt, patched) batch, as the published code does."""
    adapter = case.adapter
    batch = stack_rows([case.clean, case.corrupt, case.corrupt])
    module, kind = adapter.site_module(HEAD_SITE_PARENT.get(patch.site, patch.site), patch.layer)
    dims = slice(None) if patch.head < 0 else slice(patch.head * adapter.head_dim, (patch.head + 1) * adapter.head_dim)

    def copy_clean_row(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[2, patch.position, dims] = x[0, patch.position, dims]
        return x

    with reference.hooked(module, kind, copy_clean_row):
        return case.rows_logits(adapter, batch)[2]


# -- measurement ----------------------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    _sync()
    start = time.perf_counter()
    value = fn()
    _sync()
    return value, time.perf_counter() - start


def measure(case: Case, n_hooked: int, n_three_row: int, batch_size: int, seed: int) -> dict:
    adapter, clean, corrupt = case.adapter, case.clean, case.corrupt
    rows, t_fast = _timed(
        lambda: fast.patch_sample(adapter, clean, corrupt, case.patches, case.tau, case.tau_p, batch_size=batch_size)
    )
    subset = sorted(random.Random(seed).sample(range(len(case.patches)), n_hooked))

    # (a): clean activations captured once; one hooked forward of the corrupt input per patch.
    clean_logits, clean_acts = reference.capture(adapter, clean, [(p.site, p.layer) for p in case.patches])
    corrupt_logits = adapter.answer_logits(corrupt)
    s_clean, s_corrupt = scores(clean_logits, case.tau, case.tau_p), scores(corrupt_logits, case.tau, case.tau_p)
    reference_rows, t_hooked = [], []
    for i in subset:
        p = case.patches[i]
        logits, seconds = _timed(partial(reference.run_patched, adapter, corrupt, p, clean_acts))
        t_hooked.append(seconds)
        reference_rows.append(
            result_row(
                p.site,
                p.layer,
                p.head,
                p.position,
                clean.tokens[p.position],
                s_clean,
                s_corrupt,
                scores(logits, case.tau, case.tau_p),
            )
        )
    err = fast.max_relative_error([rows[i] for i in subset], reference_rows)

    # (b): the 3-row batch per patch; its patched row must agree with (a) too.
    t_three, err_three = [], 0.0
    for k, i in enumerate(subset[:n_three_row]):
        logits, seconds = _timed(partial(three_row_patch, case, case.patches[i]))
        t_three.append(seconds)
        ld, ref = scores(logits, case.tau, case.tau_p).ld, reference_rows[k]["ld_patched"]
        err_three = max(err_three, abs(ld - ref) / max(abs(ref), 1e-6))
    n_noop = sum(r["ld_patched"] == r["ld_corrupt"] for r in rows)
    return dict(
        name=case.name,
        description=case.description,
        n_patches=len(case.patches),
        n_noop=n_noop,
        t_fast=t_fast,
        per_fast=t_fast / len(case.patches),
        per_hooked=sum(t_hooked) / len(t_hooked),
        per_three=sum(t_three) / len(t_three) if t_three else float("nan"),
        n_hooked=len(t_hooked),
        n_three=len(t_three),
        err=err,
        err_three=err_three,
        ld_clean=s_clean.ld,
        ld_corrupt=s_corrupt.ld,
    )


def _median_timed(fn: Callable[[], T], repeats: int) -> tuple[T, float]:
    """The last value of `repeats` timed calls of `fn` and their median time."""
    runs = [_timed(fn) for _ in range(max(repeats, 1))]
    return runs[-1][0], statistics.median(seconds for _, seconds in runs)


def engine_sites(adapter: VLMAdapter) -> list[str]:
    """The default screen's sites that the patching engines patch: module sites and the head site."""
    return [site for site in screen_sites(adapter) if site in (*adapter.module_sites, adapter.head_site)]


def screen_patches(adapter: VLMAdapter, inp: ModelInput) -> list[Patch]:
    """Every site of the default attribution screen that an engine can patch: each module site at each
    layer and each position 0..T-1, each head at each layer and position (image positions included).

    Left out, though the screen estimates them too: the image-embedding rows (site "image"), which no
    engine patches (they are the image encoder's output, not a site of the patched stream), and the
    fusion attention's query and key sites (`attribution.qk_sites`), which only `patch_queries_keys`
    patches, one full forward each. So the exact cost extrapolated from these is a lower bound.
    """
    positions = range(inp.input_ids.shape[1])
    layers = range(adapter.n_layers)
    patches: list[Patch] = []
    for site in engine_sites(adapter):
        if site in HEAD_SITE_PARENT:
            heads = range(adapter.n_heads)
            patches += [
                Patch(site, layer, position, head) for layer in layers for position in positions for head in heads
            ]
        else:
            patches += [Patch(site, layer, position) for layer in layers for position in positions]
    return patches


def measure_screen(case: Case, n_patches: int, repeats: int, batch_size: int, seed: int) -> dict:
    """Cost of one default AtP screen of the case's sample (every site it covers), in seconds and in
    forward-equivalents, against exact patching of its engine-patchable sites (`screen_patches`),
    extrapolated from a random subset of `n_patches` of them."""
    adapter, clean, corrupt = case.adapter, case.clean, case.corrupt
    estimates, t_screen = _median_timed(
        lambda: attribution_estimates(adapter, clean, corrupt, case.tau, case.tau_p, method="atp"), repeats
    )
    # After the screens: every timing below runs on a warm allocator (glibc's heap grown and its mmap
    # threshold raised by the screen's large buffers, as it is a few chunks into a long exact run; cold,
    # a fresh process ran its first 128 sites of the decoder layout ~1.7× slower; docs/performance.md).
    _, t_forward = _median_timed(lambda: adapter.answer_logits(corrupt), repeats)
    patches = screen_patches(adapter, clean)
    counts = {site: 0 for site in screen_sites(adapter)}
    for (site, _), value in estimates.values.items():
        counts[site] += value.numel()
    n_patchable = sum(counts[site] for site in engine_sites(adapter))
    if n_patchable != len(patches):
        raise RuntimeError(
            f"{case.name}: the screen gave {n_patchable} estimates of engine-patchable sites, "
            f"the bench enumerates {len(patches)}"
        )
    n_image_rows = counts.get(IMAGE_SITE, 0)
    n_query_key = sum(n for site, n in counts.items() if site in qk_sites(adapter))
    subset = random.Random(seed).sample(patches, min(n_patches, len(patches)))

    def exact(chosen: list[Patch]) -> list[dict]:
        return fast.patch_sample(adapter, clean, corrupt, chosen, case.tau, case.tau_p, batch_size=batch_size)

    _, t_setup = _timed(partial(exact, []))  # the engine's clean and corrupt runs and caches, no patch
    _, t_subset = _timed(partial(exact, subset))
    per_patch = max(t_subset - t_setup, 0.0) / len(subset)
    t_exact = t_setup + per_patch * len(patches)
    return dict(
        name=case.name,
        seq_len=clean.input_ids.shape[1],
        t_forward=t_forward,
        t_screen=t_screen,
        forwards=t_screen / t_forward,
        repeats=max(repeats, 1),
        n_estimates=sum(counts.values()),
        n_image_rows=n_image_rows,
        n_query_key=n_query_key,
        n_sites=len(patches),
        n_subset=len(subset),
        t_setup=t_setup,
        t_subset=t_subset,
        per_patch=per_patch,
        t_exact=t_exact,
        speedup=t_exact / t_screen,
    )


def _screen_line(s: dict) -> str:
    return (
        f"  screen (AtP, {s['n_estimates']} estimates: {s['n_image_rows']} image-embedding rows, "
        f"{s['n_query_key']} queries / keys, {s['n_sites']} module and head sites): "
        f"{1e3 * s['t_screen']:.0f} ms = {s['forwards']:.2f} forward-equivalents (forward {1e3 * s['t_forward']:.0f} "
        f"ms; medians of {s['repeats']}); exact patching of the {s['n_sites']} module and head sites "
        f"({s['seq_len']} positions): ~{s['t_exact']:.0f} s extrapolated (fast engine: setup {s['t_setup']:.1f} s "
        f"+ {1e3 * s['per_patch']:.1f} ms / site on {s['n_subset']} random sites); screen speedup "
        f"{s['speedup']:.0f}×"
    )


def _screen_table(screens: list[dict]) -> str:
    lines = [
        "| model | positions | screen: ms | forward: ms | forward-equivalents | module + head sites | exact: ms / site "
        "(n) | exact: est. s | screen speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in screens:
        lines.append(
            f"| {s['name']} | {s['seq_len']} | {1e3 * s['t_screen']:.0f} | {1e3 * s['t_forward']:.0f} | "
            f"{s['forwards']:.2f} | {s['n_sites']} | {1e3 * s['per_patch']:.1f} (n={s['n_subset']}) | "
            f"{s['t_exact']:.0f} | {s['speedup']:.0f}× |"
        )
    return "\n".join(lines)


def bench_line(results: list[dict], screens: Sequence[dict] = ()) -> str:
    """The last line: `bench: <family>_speedup=<x> ... max_rel_err=<e>`, then each screened family's
    `<prefix>screen_forwards=<f> <prefix>screen_speedup=<x>` (`screen_prefixes`)."""
    entries = [f"{r['name']}_speedup={r['per_hooked'] / r['per_fast']:.1f}" for r in results]
    entries.append(f"max_rel_err={max(r['err'] for r in results):.1e}")
    for s in screens:
        prefix = s["prefix"]
        entries += [f"{prefix}screen_forwards={s['forwards']:.2f}", f"{prefix}screen_speedup={s['speedup']:.1f}"]
    return "bench: " + " ".join(entries)


def _table(results: list[dict]) -> str:
    lines = [
        "| model | patched runs | fast: total s | fast: ms / run | (a) hooked: ms / run | (b) 3-row: ms / run "
        "| speedup vs (a) | speedup vs (b) | max rel err (a) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['n_patches']} | {r['t_fast']:.1f} | {1e3 * r['per_fast']:.1f} | "
            f"{1e3 * r['per_hooked']:.0f} (n={r['n_hooked']}) | {1e3 * r['per_three']:.0f} (n={r['n_three']}) | "
            f"{r['per_hooked'] / r['per_fast']:.0f}× | {r['per_three'] / r['per_fast']:.0f}× | {r['err']:.1e} |"
        )
    return "\n".join(lines)


def _real_size_table(results: list[dict]) -> str:
    lines = [
        f"| model | patched runs / sample | fast: s / sample | fast: runs / s | est. {PAPER_SAMPLES} samples "
        "(one corruption) | (a) hooked: ms / run | speedup vs (a) | max rel err (a) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['n_patches']} | {r['t_fast']:.1f} | {1 / r['per_fast']:.1f} | "
            f"{PAPER_SAMPLES * r['t_fast'] / 3600:.2f} h | {1e3 * r['per_hooked']:.0f} (n={r['n_hooked']}) | "
            f"{r['per_hooked'] / r['per_fast']:.0f}× | {r['err']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    modules = bench_modules()
    prefixes = screen_prefixes()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--families", nargs="+", choices=list(modules), default=list(modules), help="families to run (default: all)"
    )
    parser.add_argument("--hooked", type=int, default=4, help="patches timed with (a), and checked (default 4)")
    parser.add_argument(
        "--three-row", type=int, default=2, help="patches timed with (b) (default 2; none at real size)"
    )
    parser.add_argument(
        "--screen-patches",
        type=int,
        default=256,
        help=f"random sites of the attribution screen's set patched exactly to extrapolate its cost "
        f"({', '.join(screen_prefixes())}; default 256; 0: no screen)",
    )
    parser.add_argument(
        "--screen-repeats", type=int, default=3, help="timed screens and forwards, median taken (default 3)"
    )
    parser.add_argument("--batch-size", type=int, default=fast.DEFAULT_BATCH_ROWS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--real-size",
        action="store_true",
        help="the real checkpoints' dimensions in bfloat16 (needs a GPU unless --device cpu)",
    )
    parser.add_argument(
        "--device", help="torch device, also of the scaled bench (default: cuda if available, else cpu)"
    )
    args = parser.parse_args(argv)
    if args.real_size and args.device != "cpu" and not torch.cuda.is_available():
        # Checked before anything is built: a 7B model on a CPU would run for days.
        sys.exit(
            "bench: --real-size needs a CUDA GPU and none is available; pass --device cpu to run it on the CPU anyway"
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    n_three_row = 0 if args.real_size else args.three_row
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, load average at start {os.getloadavg()[0]:.2f}; torch {torch.__version__}; "
        f"device {device}{' (real size, bfloat16)' if args.real_size else ''}"
    )
    results: list[dict] = []
    screens: list[dict] = []
    for family in args.families:
        case, seconds = _timed(partial(modules[family].bench_case, args.real_size, family=family, device=device))
        print(f"{case.description}: built in {seconds:.0f} s; {len(case.patches)} patched runs", flush=True)
        result = measure(case, args.hooked, n_three_row, args.batch_size, args.seed)
        print(
            f"  LD clean {result['ld_clean']:.4f}, corrupt {result['ld_corrupt']:.4f}; "
            f"{result['n_noop']} runs equal to the corrupt run (clean value identical to the corrupt one); "
            f"(b) vs (a) rel err {result['err_three']:.1e}; load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        results.append(result)
        if family in prefixes and args.screen_patches > 0:
            screen = measure_screen(case, args.screen_patches, args.screen_repeats, args.batch_size, args.seed)
            screens.append({**screen, "prefix": prefixes[family]})
            print(_screen_line(screens[-1]), flush=True)
        del case
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(
        f"(a) and (b) timed on a random subset (seed {args.seed}) of each patch set; "
        f"load average at end {os.getloadavg()[0]:.2f}"
    )
    print(_real_size_table(results) if args.real_size else _table(results))
    if screens:
        print(
            f"Attribution screen (AtP) against exact patching of its module and head sites at every position, "
            f"extrapolated from {args.screen_patches} random ones (seed {args.seed}; image-embedding rows and "
            f"queries / keys not counted):"
        )
        print(_screen_table(screens))
    print(bench_line(results, screens))


if __name__ == "__main__":
    # Run the imported `notice.bench`, the module the family bench modules import (`Case`, helpers),
    # not this `__main__` copy of it.
    from notice.bench import main as bench_main

    bench_main()
