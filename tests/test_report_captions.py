"""The Snakemake report's captions render as reStructuredText without a docutils message.

Snakemake renders a caption with Jinja (`snakemake.wildcards` etc.), then docutils' `publish_parts` to
HTML; docutils prints its warnings and errors (e.g. `|exact|` read as an undefined substitution) to
stderr and goes on, so a broken caption shows only as a line in the log of every `make demo`. Here every
caption the rules name is rendered the same way, with the messages collected.
"""

import io
import re
from pathlib import Path
from types import SimpleNamespace

import docutils.core
import jinja2
import pytest

ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = sorted((ROOT / "report_captions").glob("*.rst"))
# wildcard values with the characters model ids and dataset names bring (a slash, underscores, a dot)
WILDCARDS = SimpleNamespace(model="org/toy_llava-1.5", dataset="svo_probes")


def caption_messages(text: str) -> str:
    """docutils' messages (warnings and errors) on `text` rendered as Snakemake renders a caption (its
    `writer_name="html"` is the same writer under a name docutils 2.0 drops)."""
    # Snakemake's own Jinja settings; StrictUndefined so that a misspelt name fails here instead of vanishing
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    rst = env.from_string(text).render(snakemake=SimpleNamespace(wildcards=WILDCARDS))
    messages = io.StringIO()
    docutils.core.publish_parts(rst, writer="html", settings_overrides={"warning_stream": messages})
    return messages.getvalue()


def test_every_caption_named_by_the_rules_exists_and_every_caption_is_named():
    rules = "\n".join(path.read_text() for path in sorted((ROOT / "rules").glob("*.smk")))
    named = {ROOT / "rules" / name for name in re.findall(r'caption="([^"]+)"', rules)}
    assert {path.resolve() for path in named} == set(CAPTIONS)


@pytest.mark.parametrize("caption", CAPTIONS, ids=lambda path: path.name)
def test_caption_renders_without_a_docutils_message(caption):
    assert caption_messages(caption.read_text()) == ""


def test_the_check_catches_an_undefined_substitution():
    assert 'Undefined substitution referenced: "exact"' in caption_messages("the score against |exact| effects")
