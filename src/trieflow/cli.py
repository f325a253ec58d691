"""The `trieflow` command. Subcommands stay thin: each calls one function of a module."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from trieflow.version import __version__

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
testenv_app = typer.Typer(
    no_args_is_help=True, help="A real Kubernetes control plane with simulated GPU nodes."
)
app.add_typer(testenv_app, name="testenv")
err = Console(stderr=True)

StateDir = Annotated[
    Path | None,
    typer.Option("--dir", help="Where the cluster keeps its files (default: user cache)."),
]


@app.command()
def version() -> None:
    """Print the trieflow version."""
    typer.echo(__version__)


@app.command()
def run(
    manifest: Annotated[Path, typer.Argument(help="An RLJob manifest (YAML).", exists=True)],
) -> None:
    """Run an RLJob locally, on this machine."""
    from trieflow.localrun import ManifestError, run_local

    try:
        run_local(manifest, Console())
    except ManifestError as error:
        err.print(f"[red]invalid RLJob[/red] {error}")
        raise typer.Exit(2) from error


@app.command()
def crd() -> None:
    """Print the RLJob CustomResourceDefinition generated from the API model."""
    from trieflow.api.crd import render_crd_yaml

    typer.echo(render_crd_yaml(), nl=False)


@testenv_app.command("build")
def build_cmd() -> None:
    """Build (once) and cache the Kubernetes 1.20.2 control-plane binaries."""
    from trieflow.testenv.binaries import ensure_helm, ensure_kube_binaries

    binaries = ensure_kube_binaries()
    typer.echo(f"kubernetes: {binaries.apiserver.parent}")
    typer.echo(f"etcd: {binaries.etcd}")
    typer.echo(f"helm: {ensure_helm()}")


@testenv_app.command("up")
def up_cmd(directory: StateDir = None) -> None:
    """Start etcd, apiserver, controller-manager, scheduler and the node simulator."""
    from trieflow.testenv.cluster import up

    state = up(directory)
    err.print(f"[green]test cluster up[/green] at {state.apiserver_url}")
    typer.echo(f"export KUBECONFIG={state.kubeconfig}")


@testenv_app.command("down")
def down_cmd(directory: StateDir = None) -> None:
    """Stop every process `up` started."""
    from trieflow.testenv.cluster import down

    err.print("test cluster stopped" if down(directory) else "no test cluster was running")


@testenv_app.command("env")
def env_cmd(directory: StateDir = None) -> None:
    """Print shell exports for kubectl: `eval "$(trieflow testenv env)"`."""
    from trieflow.testenv.cluster import env_lines

    for line in env_lines(directory):
        typer.echo(line)


if __name__ == "__main__":
    app()
