"""The `meshctl` command: one typer app, one sub-app per noun (cli/<noun>.py).

Each noun module exposes ``register(app)``, which adds its commands or
sub-app to the root; the CLI stays thin: parse → call → render.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="meshctl",
    help="Istio's service mesh for laptops and VMs: sidecars, Pilot, Mixer and Citadel, no Kubernetes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# Modules under meshctl.cli that add commands; each has register(app).
NOUNS = [
    "proxy",
    "route",
    "pilot",
    "mesh",
    "citadel",
    "fault",
    "mixer",
    "secret",
    "mirror",
    "observe",
]

def _version(value: bool) -> None:
    if value:
        from ..launch import version_line

        print(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="Version, commit, Python, and compiled or pure mode."),
) -> None:
    pass


for _noun in NOUNS:
    importlib.import_module(f"meshctl.cli.{_noun}").register(app)


def main() -> None:
    app()
