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
    steps: Annotated[
        int | None, typer.Option(help="Override spec.algorithm.totalSteps.", min=1)
    ] = None,
    tasks: Annotated[
        Path | None, typer.Option(help="Task file (JSONL); default: the job's, else the demo.")
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="Keep logs, checkpoints and weights here.")
    ] = None,
) -> None:
    """Run an RLJob locally, on this machine: operator, vLLM (CPU), proxies, trainer."""
    from trieflow.localrun import ManifestError, run_local

    try:
        run_local(manifest, Console(), steps=steps, tasks=tasks, workdir=workdir)
    except ManifestError as error:
        err.print(f"[red]invalid RLJob[/red] {error}")
        raise typer.Exit(2) from error


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def proxy(ctx: typer.Context) -> None:
    """Run the trajectory-recording proxy (options: `trieflow proxy --help`)."""
    from trieflow.proxy.main import main

    raise typer.Exit(main(ctx.args))


@app.command()
def crd() -> None:
    """Print the RLJob CustomResourceDefinition generated from the API model."""
    from trieflow.api.crd import render_crd_yaml

    typer.echo(render_crd_yaml(), nl=False)


@app.command()
def operator(  # noqa: PLR0917 (typer maps each option to a parameter)
    namespace: Annotated[
        list[str] | None,
        typer.Option(
            "--namespace", "-n", help="Watch only these namespaces (globs allowed; repeatable)."
        ),
    ] = None,
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", "-A", help="Watch every namespace (default).")
    ] = False,
    kubeconfig: Annotated[
        Path | None, typer.Option(help="Kubeconfig (default: in-cluster, then $KUBECONFIG).")
    ] = None,
    context: Annotated[str | None, typer.Option(help="Kubeconfig context.")] = None,
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port; 0: off.")] = 8080,
    liveness: Annotated[
        str, typer.Option(help="Liveness endpoint URL; empty: off.")
    ] = "http://0.0.0.0:8081/healthz",
    peering: Annotated[
        str | None, typer.Option(help="Kopf peering name for HA replicas (default: standalone).")
    ] = None,
    priority: Annotated[
        int | None, typer.Option(help="Peering priority (default: random, distinct per replica).")
    ] = None,
    trainer_image: Annotated[str | None, typer.Option(help="Default trainer image.")] = None,
    rollout_image: Annotated[str | None, typer.Option(help="Default vLLM image.")] = None,
    sandbox_image: Annotated[str | None, typer.Option(help="Default sandbox image.")] = None,
    proxy_image: Annotated[str | None, typer.Option(help="Default proxy sidecar image.")] = None,
    node_not_ready_grace: Annotated[
        float, typer.Option(help="Seconds a node may be NotReady before its pods are replaced.")
    ] = 60.0,
    resync: Annotated[
        float, typer.Option(help="Reconcile every job at least this often (s).")
    ] = 60.0,
    workers: Annotated[int, typer.Option(help="Jobs reconciled concurrently.")] = 8,
    log_format: Annotated[str, typer.Option(help="plain or json.")] = "json",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the operator that reconciles RLJobs (Kopf)."""
    from dataclasses import replace

    from trieflow.operator.config import OperatorConfig
    from trieflow.operator.runner import run as run_operator

    if namespace and all_namespaces:
        err.print("[red]--namespace and --all-namespaces exclude each other[/red]")
        raise typer.Exit(2)
    default = OperatorConfig()
    config = replace(
        default,
        trainer_image=trainer_image or default.trainer_image,
        rollout_image=rollout_image or default.rollout_image,
        sandbox_image=sandbox_image or default.sandbox_image,
        proxy_image=proxy_image or default.proxy_image,
        node_not_ready_grace_seconds=node_not_ready_grace,
        resync_seconds=resync,
        workers=workers,
    )
    run_operator(
        config=config,
        namespaces=namespace or (),
        kubeconfig=str(kubeconfig) if kubeconfig else None,
        context=context,
        metrics_port=metrics_port or None,
        liveness=liveness or None,
        peering=peering,
        priority=priority,
        log_format="plain" if log_format == "plain" else "json",
        verbose=verbose,
    )


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
