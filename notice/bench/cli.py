"""`make bench` (`python -m notice.bench`): the cost per patched run of the fast engine against the two usual
ways of patching, for every family of the family table (notice.families) or `--families` (`make bench
FAMILIES="<name> <name>"`).

For one sample per family, on random-weight models built from configs (no downloads), it times:
- fast: what `notice.patching.fast.patch_sample` costs on the paper's whole patch set, per patched run,
  estimated from part of it (`measure.fast_cost`): the engine's setup (clean and corrupt runs, image encoder,
  every cache) timed once, then `--fast-chunks` whole chunks of the rows that call runs, stratified over its
  run order (the chunks cut into that many strata of consecutive chunks, one drawn from each, seeded, and
  counted for its stratum's rows); cost per run = (setup + estimated rows) / patches. Whole chunks,
  not random rows: a row's cost depends on the rows it shares a chunk with (a chunk of the decoder engine
  recomputes from its earliest position), so rows drawn at random would share less than in the full run.
  With `--fast-chunks` at least the run's number of chunks every chunk runs: the full run's cost, as measured
  before;
- (a) hooked: one hooked full forward per patched run, with the clean activations cached once (what a
  TransformerLens user writes; it is `reference.run_patched`; the cache is the engine's, whose clean run the
  fast setup counts);
- (b) 3-row: the published code's batch of (clean, corrupt, patched) rows recomputed for every patch.
(a) and (b) are timed on seeded random rows among those the fast engine ran, and the engine's rows are checked
against (a)'s: max |x − ref| / max(|ref|, 1) over LD and P(τ), the contract test's definition
(`fast.max_relative_error` with floor 1; (b) against (a) likewise).

Each family's layout (model sizes, prompt, image, patch set) is the bench module its row of the family table
names (`notice.bench.layouts`), so adding a family never touches this file. A layout exposes
`bench_case(real_size=False, *, family, tiny=False, device="cpu") -> Case` (notice.bench.case). Corruption:
SIP (another image, same prompt). The patch set is `sites.default_patches`.

For the layouts that set `SCREEN_KEY_PREFIX` (`screen_prefixes`; when run) it also times the default
attribution screen (`notice.patching.attribution.attribution_estimates`, method atp: one clean forward,
one corrupt forward, one backward) on the same sample, against one forward (`answer_logits` of the
corrupt input; the ratio is the screen's cost in forward-equivalents), both the median of
`--screen-repeats` runs, and against exact patching of the screen's module and head sites: every
module site at every position, every head at every position (image positions included),
`screen_patches`. That set is far too large to run: its cost is estimated as the fast engine's above, from
`--screen-chunks` chunks of its run. The screen's image-embedding rows and query / key sites are not
counted (no engine patches them), so the ratio is a lower bound.

For the layouts that set `KNOCKOUT_KEY_PREFIX` (`knockout_prefixes`) it times the attention-knockout sweep
(`measure.measure_knockout`, notice.flow.knockout): the default edges at every window start of the default window
on the clean input, the fast engine's whole sweep (its setup included) per knocked-out run, against
`--knockout-rows` seeded rows of it run by the reference engine (one hooked forward each), which check its rows.
The layout's `KNOCKOUT_QUESTION_TOKENS` positions after the image stand for the question.

The last line printed is `bench: <family>_speedup=<x> ... max_rel_err=<e>` (speedup of the fast engine
over (a), one entry per family run), followed where screened by `<prefix>screen_forwards=<f>
<prefix>screen_speedup=<x>` (exact patching's extrapolated time over the screen's) and where knocked out by
`<prefix>knockout_speedup=<x>` and where circuits are timed by `<prefix>eap_ig_forwards=<f>
<prefix>faithfulness_speedup=<x>`; every entry is key=value.

For the layouts that set `CIRCUIT_KEY_PREFIX` (`circuit_prefixes`) it times circuits (`measure.measure_circuits`,
notice.circuits): EAP-IG scores of every edge of the sample (5 steps, the config's default; its two recorded runs
included) against one forward, in forward-equivalents (`eap_ig_forwards`); then the exact faithfulness of the top-n
edge circuits, n on a `--circuit-points` log grid, batched as the workflow runs them against one hooked forward per
circuit, which also checks them (`faithfulness_speedup`). Its token groups are the knockout's.

`--real-size` builds the real checkpoints' dimensions (random weights, bfloat16, `--device`, a GPU by
default) and reports the fast engine's patched runs per second and the estimated wall time of the
paper's 500-sample experiment per corruption; (b) is skipped and (a) only gives the ratio. It also audits the
rounding (`measure.precision_audit`, notice.method.precision): `--audit-rows` seeded rows of those the fast engine
ran (at least one per site kind) patched again by the reference engine on the same model rebuilt in float32, and
prints per family and site kind the median, 95th percentile and maximum of |logit_diff − float32 logit_diff| next
to the spread of the effects; the bench line gains `<family>_audit_p95=<p>` (the largest 95th percentile over the
family's site kinds).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from collections.abc import Sequence
from functools import partial
from types import ModuleType

import pandas as pd
import torch

from notice.bench.measure import (
    _timed,
    engine_setup,
    measure,
    measure_circuits,
    measure_knockout,
    measure_screen,
    precision_audit,
)
from notice.families import families
from notice.method.precision import audit_summary_lines
from notice.patching import fast

PAPER_SAMPLES = 500  # samples per corruption in the paper's experiment
# Defaults sized so that every family of the table runs within minutes on 2 CPU cores (docs/performance.md).
FAST_CHUNKS = 3
HOOKED = 1
THREE_ROW = 1
SCREEN_CHUNKS = 4
SCREEN_REPEATS = 2
AUDIT_ROWS = 64
KNOCKOUT_ROWS = 2
CIRCUIT_IG_STEPS = 5  # the config's default
CIRCUIT_POINTS = 6


def _screen_line(s: dict) -> str:
    return (
        f"  screen (AtP, {s['n_estimates']} estimates: {s['n_image_rows']} image-embedding rows, "
        f"{s['n_query_key']} queries / keys, {s['n_sites']} module and head sites): "
        f"{1e3 * s['t_screen']:.0f} ms = {s['forwards']:.2f} forward-equivalents (forward {1e3 * s['t_forward']:.0f} "
        f"ms; medians of {s['repeats']}); exact patching of the {s['n_sites']} module and head sites "
        f"({s['seq_len']} positions): ~{s['t_exact']:.0f} s extrapolated (fast engine: setup {s['t_setup']:.1f} s "
        f"+ {1e3 * s['per_patch']:.1f} ms / site from {s['n_subset']} sites in {s['n_chunks_run']} of its "
        f"{s['n_chunks']} chunks); screen speedup "
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


def bench_line(
    results: list[dict],
    screens: Sequence[dict] = (),
    audits: Sequence[pd.DataFrame] = (),
    knockouts: Sequence[dict] = (),
    circuits: Sequence[dict] = (),
) -> str:
    """The last line: `bench: <family>_speedup=<x> ... max_rel_err=<e>`, then each screened family's
    `<prefix>screen_forwards=<f> <prefix>screen_speedup=<x>` (`screen_prefixes`), then each audited family's
    `<family>_audit_p95=<p>` (the largest 95th percentile over its site kinds; real size only), then each knocked-out
    family's `<prefix>knockout_speedup=<x>` (`knockout_prefixes`), then each circuit-timed family's
    `<prefix>eap_ig_forwards=<f> <prefix>faithfulness_speedup=<x>` (`circuit_prefixes`)."""
    entries = [f"{r['name']}_speedup={r['per_hooked'] / r['per_fast']:.1f}" for r in results]
    entries.append(f"max_rel_err={max(r['err'] for r in results):.1e}")
    for s in screens:
        prefix = s["prefix"]
        entries += [f"{prefix}screen_forwards={s['forwards']:.2f}", f"{prefix}screen_speedup={s['speedup']:.1f}"]
    entries += [f"{audit['model'].iloc[0]}_audit_p95={audit['p95'].max():.1e}" for audit in audits]
    entries += [f"{k['prefix']}knockout_speedup={k['speedup']:.1f}" for k in knockouts]
    for c in circuits:
        entries += [
            f"{c['prefix']}eap_ig_forwards={c['forwards']:.1f}",
            f"{c['prefix']}faithfulness_speedup={c['speedup']:.1f}",
        ]
    return "bench: " + " ".join(entries)


def _table(results: list[dict]) -> str:
    lines = [
        "| model | patched runs | fast: setup s | fast: est. total s | fast: ms / run (rows timed) "
        "| (a) hooked: ms / run | (b) 3-row: ms / run | speedup vs (a) | speedup vs (b) | max rel err (a) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['n_patches']} | {r['t_setup']:.1f} | {r['t_fast']:.1f} | "
            f"{1e3 * r['per_fast']:.1f} (n={r['n_fast']}) | "
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


def _audit_table(audits: Sequence[pd.DataFrame]) -> str:
    lines = [
        "| model | site | dtype | rows audited (of those run) | median | p95 | max | effect spread |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for audit in audits:
        for r in audit.itertuples():
            lines.append(
                f"| {r.model} | {r.site} | {r.dtype} | {r.n_audited} ({r.n_rows}) | {r.median:.1e} | {r.p95:.1e} | "
                f"{r.max:.1e} | {r.effect_spread:.1e} |"
            )
    return "\n".join(lines)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def layouts() -> dict[str, ModuleType]:
    """Family -> its bench layout module, for every row of the family table (opt-in adapters included)."""
    return {row.name: row.load("bench") for row in families()}


def key_prefixes(attribute: str) -> dict[str, str]:
    """Family -> bench-line key prefix of the layouts that set `attribute` (e.g. a layout's `SCREEN_KEY_PREFIX = ""`
    gives the unprefixed `screen_speedup=`)."""
    return {family: getattr(module, attribute) for family, module in layouts().items() if hasattr(module, attribute)}


def screen_prefixes() -> dict[str, str]:
    """The layouts whose attribution screen is timed (`SCREEN_KEY_PREFIX`)."""
    return key_prefixes("SCREEN_KEY_PREFIX")


def knockout_prefixes() -> dict[str, str]:
    """The layouts whose attention-knockout sweep is timed (`KNOCKOUT_KEY_PREFIX`: "" gives `knockout_speedup=`)."""
    return key_prefixes("KNOCKOUT_KEY_PREFIX")


def _knockout_line(k: dict) -> str:
    return (
        f"  knockout: {k['n_rows']} knocked-out runs (default edges, window {k['window']}) by the fast engine in "
        f"{k['t_fast']:.1f} s = {1e3 * k['per_fast']:.1f} ms / run (setup included); reference (one hooked forward "
        f"per run): {1e3 * k['per_reference']:.0f} ms / run (n={k['n_reference']}); knockout speedup "
        f"{k['speedup']:.0f}×, max rel err {k['err']:.1e}"
    )


def circuit_prefixes() -> dict[str, str]:
    """The layouts whose circuits are timed (`CIRCUIT_KEY_PREFIX`: "" gives `eap_ig_forwards=` and
    `faithfulness_speedup=`)."""
    return key_prefixes("CIRCUIT_KEY_PREFIX")


def _circuit_line(c: dict) -> str:
    return (
        f"  circuits: EAP-IG ({c['ig_steps']} steps) of {c['n_edges']} edges, both runs recorded, in "
        f"{c['t_scores']:.1f} s = {c['forwards']:.1f} forward-equivalents (forward {c['t_forward']:.2f} s); "
        f"faithfulness of {c['n_circuits']} top-n circuits: {c['t_fast']:.1f} s batched, {c['t_hooked']:.1f} s one "
        f"hooked forward per circuit; faithfulness speedup {c['speedup']:.1f}×, max rel err {c['err']:.1e}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    modules = layouts()
    prefixes = screen_prefixes()
    knockout_keys = knockout_prefixes()
    circuit_keys = circuit_prefixes()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--families", nargs="+", choices=list(modules), default=list(modules), help="families to run (default: all)"
    )
    parser.add_argument(
        "--fast-chunks",
        type=int,
        default=FAST_CHUNKS,
        help=f"chunks of the fast engine's run of each patch set timed, one per stratum of its run order, to estimate "
        f"the whole run's cost (default {FAST_CHUNKS}; at least its number of chunks: all of them)",
    )
    parser.add_argument(
        "--hooked", type=int, default=HOOKED, help=f"patches timed with (a), and checked (default {HOOKED})"
    )
    parser.add_argument(
        "--three-row",
        type=int,
        default=THREE_ROW,
        help=f"patches timed with (b) (default {THREE_ROW}; none at real size)",
    )
    parser.add_argument(
        "--screen-chunks",
        type=int,
        default=SCREEN_CHUNKS,
        help=f"chunks of the exact run of the attribution screen's sites timed to extrapolate its cost, as "
        f"--fast-chunks ({', '.join(screen_prefixes())}; default {SCREEN_CHUNKS}; 0: no screen)",
    )
    parser.add_argument(
        "--screen-repeats",
        type=int,
        default=SCREEN_REPEATS,
        help=f"timed screens and forwards, median taken (default {SCREEN_REPEATS})",
    )
    parser.add_argument(
        "--knockout-rows",
        type=int,
        default=KNOCKOUT_ROWS,
        help=f"knocked-out runs timed with the reference engine, and checked ({', '.join(knockout_prefixes())}; "
        f"default {KNOCKOUT_ROWS}; 0: no knockout)",
    )
    parser.add_argument(
        "--circuit-points",
        type=int,
        default=CIRCUIT_POINTS,
        help=f"points of the timed faithfulness curve ({', '.join(circuit_prefixes())}; default {CIRCUIT_POINTS}; "
        "0: no circuits)",
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
    parser.add_argument(
        "--audit-rows",
        type=int,
        default=AUDIT_ROWS,
        help=f"--real-size: rows of those the fast engine ran patched again on the model in float32, at least one "
        f"per site kind (default {AUDIT_ROWS}; 0: no precision audit)",
    )
    args = parser.parse_args(argv)
    if args.fast_chunks < 1 or args.hooked < 1:
        parser.error("--fast-chunks and --hooked must be at least 1 (the speedup is fast against (a))")
    if args.audit_rows < 0:
        parser.error(f"--audit-rows must be 0 (no audit) or more, got {args.audit_rows}")
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
    start = time.perf_counter()
    results: list[dict] = []
    screens: list[dict] = []
    audits: list[pd.DataFrame] = []
    knockouts: list[dict] = []
    circuits: list[dict] = []
    for family in args.families:
        case, t_build = _timed(partial(modules[family].bench_case, args.real_size, family=family, device=device))
        print(f"{case.description}: built in {t_build:.0f} s; {len(case.patches)} patched runs", flush=True)
        setup = engine_setup(case)  # one engine for the sample: the patch set's run and the screen's
        result, t_measure = _timed(
            partial(measure, case, args.fast_chunks, args.hooked, n_three_row, args.batch_size, args.seed, setup)
        )
        print(
            f"  LD clean {result['ld_clean']:.4f}, corrupt {result['ld_corrupt']:.4f}; "
            f"{result['n_noop']} runs equal to the corrupt run (clean value identical to the corrupt one); "
            f"fast: setup {result['t_setup']:.1f} s, {result['n_fast']} rows in {result['n_chunks_run']} of "
            f"{result['n_chunks']} chunks {result['t_rows']:.1f} s; (b) vs (a) rel err {result['err_three']:.1e}; "
            f"measured in {setup.seconds + t_measure:.0f} s; load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        results.append(result)
        if family in prefixes and args.screen_chunks > 0:
            screen, t_screen = _timed(
                partial(
                    measure_screen, case, args.screen_chunks, args.screen_repeats, args.batch_size, args.seed, setup
                )
            )
            screens.append({**screen, "prefix": prefixes[family]})
            print(f"{_screen_line(screens[-1])}; screen timed in {t_screen:.0f} s", flush=True)
        if family in knockout_keys and args.knockout_rows > 0:
            question_tokens = modules[family].KNOCKOUT_QUESTION_TOKENS
            knockout, t_knockout = _timed(
                partial(measure_knockout, case, question_tokens, args.knockout_rows, args.batch_size, args.seed)
            )
            knockouts.append({**knockout, "prefix": knockout_keys[family]})
            print(f"{_knockout_line(knockout)}; timed in {t_knockout:.0f} s", flush=True)
        if family in circuit_keys and args.circuit_points > 0:
            question_tokens = modules[family].KNOCKOUT_QUESTION_TOKENS
            circuit, t_circuit = _timed(
                partial(
                    measure_circuits, case, question_tokens, CIRCUIT_IG_STEPS, args.circuit_points, args.screen_repeats
                )
            )
            circuits.append({**circuit, "prefix": circuit_keys[family]})
            print(f"{_circuit_line(circuit)}; timed in {t_circuit:.0f} s", flush=True)
        del setup  # the engine's caches, before the audit's float32 model
        _free_memory()
        if args.real_size and args.audit_rows > 0:
            (audited, audit), t_audit = _timed(
                partial(precision_audit, case, result["fast_rows"], args.audit_rows, args.seed)
            )
            audits.append(audit)
            print(
                f"  precision audit: {len(audited)} of the {len(result['fast_rows'])} rows the fast engine ran "
                f"(seed {args.seed}) patched again in float32, in {t_audit:.0f} s:",
                flush=True,
            )
            for line in audit_summary_lines(audit):
                print(f"    {line}", flush=True)
        del case
        _free_memory()
    print(
        f"fast: {args.fast_chunks} chunks of each patch set's run timed (one per stratum of its order), (a) and (b) "
        f"on random rows among theirs (seed {args.seed}); wall time {time.perf_counter() - start:.0f} s; "
        f"load average at end {os.getloadavg()[0]:.2f}"
    )
    print(_real_size_table(results) if args.real_size else _table(results))
    if screens:
        print(
            f"Attribution screen (AtP) against exact patching of its module and head sites at every position, "
            f"extrapolated from {args.screen_chunks} chunks of their run (seed {args.seed}; image-embedding rows and "
            f"queries / keys not counted):"
        )
        print(_screen_table(screens))
    if audits:
        print(
            f"Precision audit: |logit_diff - float32 logit_diff| over {args.audit_rows} seeded rows of those the "
            f"fast engine ran (at least one per site kind), the reference engine on the same model in float32; "
            f"effect spread: standard deviation of logit_diff over the rows run:"
        )
        print(_audit_table(audits))
    print(bench_line(results, screens, audits, knockouts, circuits))
