"""The family table (notice.families): every part of every row resolves to what its readers expect, a row that
lacks a part fails naming the family and the part, and one more row is all a new family needs to be loaded,
patched by its fast engine, benched and listed (tests/throwaway_family.py)."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from types import ModuleType

import pytest
import throwaway_family
from toy_adapters import clean_and_corrupt, one_torch_thread, reinit
from transformers import AutoConfig

from notice import families
from notice.adapters.base import VLMAdapter
from notice.adapters.loading import family_adapter, load_adapter
from notice.bench import cli
from notice.demo.toy_family import ToyFamily, split_words, toy_words
from notice.families import FAMILIES, PARTS, REQUIRED_PARTS, Family, default_family, family, family_names
from notice.patching import fast, reference
from notice.patching.fast_core import FastFamily
from notice.patching.sites import default_patches


def part_problem(row: Family, part: str) -> str | None:
    """Why `row`'s `part` is not what its reader expects (None: it is)."""
    ref = getattr(row, part)
    if not ref and part not in REQUIRED_PARTS:
        return None
    try:
        value = row.load(part)  # type: ignore[arg-type]
    except LookupError as error:
        return str(error)
    expected = {
        "adapter": lambda v: isinstance(v, type) and issubclass(v, VLMAdapter),
        "engine": lambda v: isinstance(v, type) and issubclass(v, FastFamily),
        "tiny": lambda v: callable(v) and "seed" in inspect.signature(v).parameters,
        "bench": lambda v: isinstance(v, ModuleType) and callable(getattr(v, "bench_case", None)),
        "toy": lambda v: isinstance(v, type) and issubclass(v, ToyFamily),
    }[part]
    return None if expected(value) else f"{row.name}: {part} = {ref!r} is not what the {part} part must be"


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("name", family_names())
def test_every_part_of_every_row_is_what_its_reader_expects(name, part):
    assert part_problem(family(name), part) is None


def test_a_row_that_lacks_a_part_is_named_with_the_part():
    broken = Family("broken", ("llava",), "notice.adapters.llava:LlavaAdapter", "", "x", "notice.bench.layouts.nope")
    assert part_problem(broken, "engine") == "family table: 'broken' has no engine"
    assert "broken.tiny = 'x'" in str(part_problem(broken, "tiny"))
    assert "broken.bench = 'notice.bench.layouts.nope'" in str(part_problem(broken, "bench"))
    wrong = Family(
        "wrong", ("llava",), "notice.adapters.llava:LlavaAdapter", "notice.adapters.llava:LlavaAdapter", "", ""
    )
    assert (
        part_problem(wrong, "engine")
        == "wrong: engine = 'notice.adapters.llava:LlavaAdapter' is not what the engine part must be"
    )


def test_names_are_unique_and_each_model_type_has_one_default_family():
    names = family_names()
    assert len(set(names)) == len(names)
    for row in FAMILIES:
        for model_type in row.model_types:
            defaults = [f.name for f in FAMILIES if model_type in f.model_types and not f.opt_in]
            assert len(defaults) == 1, (model_type, defaults)


@pytest.mark.parametrize("name", family_names())
def test_model_types_are_those_of_the_adapters_transformers_class(name):
    # A checkpoint's config.json model_type picks the row; the row's adapter loads it with model_class.
    row = family(name)
    assert family_adapter(row).model_class.config_class.model_type in row.model_types
    assert family_adapter(row).__name__ in row.adapter


def test_adapters_know_their_family_from_the_table():
    for row in FAMILIES:
        adapter = object.__new__(family_adapter(row))  # no model needed to ask the name
        assert adapter.family == row.name


def test_the_toys_use_only_the_demo_vocabulary():
    words = set(toy_words())
    for row in FAMILIES:
        if row.toy is not None:
            toy = row.load("toy")
            template = toy.prompt_template.replace("{question}", "")
            for token in toy.special_tokens:
                template = template.replace(token, "")
            assert set(split_words(template)) <= words, row.name


@pytest.fixture
def twin(monkeypatch: pytest.MonkeyPatch) -> Family:
    """The table with one more row: a throwaway family."""
    monkeypatch.setattr(families, "FAMILIES", (*FAMILIES, throwaway_family.ROW))
    return throwaway_family.ROW


def test_one_row_adds_a_family_to_the_loader_the_engines_and_the_bench(twin, tmp_path):
    assert all(part_problem(twin, part) is None for part in PARTS)
    assert default_family("llava").name == "llava"  # an opt-in row is never a model type's default
    model, processor = twin.load("tiny")(seed=1)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "llava"
    adapter = load_adapter(str(tmp_path), adapter="twin_llava")
    assert type(adapter) is throwaway_family.TwinLlavaAdapter and adapter.family == "twin_llava"
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'; adapters: \[.*'twin_llava'"):
        load_adapter(str(tmp_path), adapter="nope")
    with pytest.raises(ValueError, match=r"adapter 'blip' takes model types \['blip'\].*'llava'.*'twin_llava'"):
        load_adapter(str(tmp_path), adapter="blip")
    # Its fast engine equals the oracle on its default patch set.
    adapter.model = reinit(adapter.model, 0.3, 1)
    clean, corrupt = clean_and_corrupt(adapter, "SIP")
    patches = default_patches(adapter, clean, 5)
    with one_torch_thread():
        rows = fast.patch_sample(adapter, clean, corrupt, patches, 5, 6)
        expected = reference.patch_sample(adapter, clean, corrupt, patches, 5, 6)
    assert fast.family_engine(adapter).__name__ == "DecoderFast"
    assert fast.max_relative_error(rows, expected, floor=1.0) <= 1e-5
    assert any(r["ld_patched"] != r["ld_corrupt"] for r in expected)
    # `make bench` lists it, and its layout wraps the model in its adapter.
    assert "twin_llava" in cli.layouts()
    case = twin.load("bench").bench_case(family="twin_llava", tiny=True)
    assert type(case.adapter) is throwaway_family.TwinLlavaAdapter


def test_an_adapter_outside_the_table_has_no_fast_engine():
    class Stray(throwaway_family.TwinLlavaAdapter):
        pass

    stray = object.__new__(Stray)
    assert stray.family == "Stray"
    with pytest.raises(ValueError, match=re.escape("adapter Stray is not in the family table")):
        fast.family_engine(stray)


def test_loading_one_family_imports_only_its_own_modules():
    # The table imports nothing; the loader imports the one adapter it needs.
    code = (
        "import sys; from notice.adapters.loading import adapter_class; adapter_class('m', 'llava'); "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('notice.'))))"
    )
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    assert "notice.adapters.llava" in loaded
    assert not {"notice.adapters.blip", "notice.adapters.qwen2_vl", "notice.patching.fast", "notice.bench"} & loaded
