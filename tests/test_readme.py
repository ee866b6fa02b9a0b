"""README.md stays true to the code it documents."""

from __future__ import annotations

from pathlib import Path

from fbp.config_cmd import BEGIN, END, reference_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def test_config_reference_in_readme_matches_settings():
    text = README.read_text()
    embedded = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert embedded == reference_markdown().strip(), (
        "README's configuration reference is stale: paste the output of `fbp config reference`"
    )


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
