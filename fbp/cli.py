"""The ``fbp`` command.  Each subcommand lives in the module that does the work;
this file only wires them together, importing lazily so ``fbp stack status``
does not pay for importing torch."""

from __future__ import annotations

import importlib
from typing import Any

import typer

app = typer.Typer(no_args_is_help=True, help="feedback-predictor: streaming movie-rating prediction")



@app.callback()
def main() -> None:
    """feedback-predictor: streaming movie-rating prediction."""


# name -> (module, attribute, kind): kind "group" is a typer.Typer, "command" a function.
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "stack": ("fbp.stack", "app", "group"),
    "replay": ("stream.replay", "cli", "command"),
    "tail": ("stream.tail", "cli", "command"),
    "train": ("trainer.train", "cli", "command"),
    "evaluate": ("trainer.evaluate", "cli", "command"),
    "worker": ("stream.worker", "cli", "command"),
    "trainer": ("trainer.service", "cli", "command"),
    "model": ("trainer.admin", "app", "group"),
    "bench": ("bench.cli", "app", "group"),
    "demo": ("fbp.demo", "cli", "command"),
    "config": ("fbp.config_cmd", "app", "group"),
    "dlq": ("stream.dlq", "app", "group"),
    "catalog": ("stream.catalog", "app", "group"),
    "user": ("fbp.user_cmd", "app", "group"),
}


def _register() -> None:
    import sys

    wanted = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    for name, (mod, attr, kind) in _COMMANDS.items():
        # Import only the module of the subcommand being run (all of them for --help).
        if wanted is not None and wanted != name and wanted in _COMMANDS:
            continue
        try:
            obj: Any = getattr(importlib.import_module(mod), attr)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(mod.split(".")[0] + "."):
                continue  # subcommand not built yet
            raise
        if kind == "group":
            app.add_typer(obj, name=name)
        else:
            app.command(name)(obj)


_register()

if __name__ == "__main__":
    app()
