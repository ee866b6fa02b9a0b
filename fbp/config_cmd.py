"""``fbp config show|reference``: the effective configuration, and the
configuration reference (Markdown) generated from the typed settings, which
README.md embeds (a test keeps the two in sync)."""

from __future__ import annotations

import typing

import orjson
import typer
from pydantic import BaseModel, SecretStr

from core.settings import ConfigError, Settings, load_settings

app = typer.Typer(no_args_is_help=True, help="Show the configuration or its reference")

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def _type_name(tp: typing.Any) -> str:
    s = str(tp).replace("typing.", "").replace("pathlib.", "").replace("pydantic.types.", "")
    s = s.replace("<class '", "").replace("'>", "")
    return s.replace("|", "\\|")


def reference_markdown() -> str:
    """One table row per setting: env var, type, default, meaning."""
    rows = ["| env var | type | default | meaning |", "|---|---|---|---|"]
    for section, field in Settings.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            doc = (sub.__doc__ or "").strip().splitlines()[0]
            for name, f in sub.model_fields.items():
                default = f.default
                if isinstance(default, SecretStr):
                    default = "***"
                shown = str(default).replace(str(_repo_root()), "<repo>")
                rows.append(
                    f"| `FBP_{section.upper()}__{name.upper()}` | {_type_name(f.annotation)} | "
                    f"`{shown}` | {f.description or doc} |"
                )
        else:
            rows.append(f"| `FBP_{section.upper()}` | {_type_name(sub)} | `{field.default}` | |")
    return "\n".join(rows)


def _repo_root() -> typing.Any:
    from core.settings import REPO_ROOT

    return REPO_ROOT


@app.command()
def show() -> None:
    """The effective configuration (defaults, FBP_CONFIG file, FBP_* env), secrets masked."""
    try:
        s = load_settings()
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    data = s.model_dump(mode="json")
    typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


@app.command()
def reference() -> None:
    """Print the configuration reference as a Markdown table."""
    typer.echo(reference_markdown())


@app.command()
def readme(path: str = "README.md") -> None:
    """Rewrite the configuration reference section of README.md in place."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text()
    if BEGIN not in text or END not in text:
        typer.echo(f"{path} has no {BEGIN} ... {END} section", err=True)
        raise typer.Exit(2)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    p.write_text(f"{head}{BEGIN}\n{reference_markdown()}\n{END}{tail}")
    typer.echo(f"updated {path}")
