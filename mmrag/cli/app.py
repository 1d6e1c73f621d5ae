"""What every command shares: the Typer app, the global options, settings from them, the
one-line fatal error, and running a flow quietly.

Global options live in the Typer context (``ctx.obj``), never in module state: each
invocation (a CLI run, a test's ``CliRunner``) starts from its own options.
"""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer

from mmrag.cli import output, startup

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Batch multimodal RAG over image dumps (Prefect + Ray + CLIP + LanceDB).")


@app.callback()
def main(
    ctx: typer.Context,
    db: Annotated[str | None, typer.Option(help="LanceDB URI [MMRAG_DB]")] = None,
    profile: Annotated[str | None, typer.Option(help="default | tiny [MMRAG_PROFILE]")] = None,
    clip_model: Annotated[str | None, typer.Option(help="open_clip model [MMRAG_CLIP_MODEL]")]
    = None,
    clip_pretrained: Annotated[str | None, typer.Option(
        help="pretrained tag or checkpoint path [MMRAG_CLIP_PRETRAINED]")] = None,
    precision: Annotated[str | None, typer.Option(help="auto|fp32|bf16|fp16")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per model batch")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address")] = None,
) -> None:
    """Global options override the environment, which overrides defaults."""
    given = dict(db=db, profile=profile, clip_model=clip_model, clip_pretrained=clip_pretrained,
                 precision=precision, batch_size=batch_size, ray_address=ray_address)
    ctx.obj = {k: v for k, v in given.items() if v is not None}


def overrides(ctx: typer.Context) -> dict:
    """The global options given on this command line (for deployments' parameters)."""
    root = ctx.find_root()
    return dict(root.obj or {})


def settings_from(ctx: typer.Context, **extra):
    """Settings from the global options plus a command's own (None = not given)."""
    from pydantic import ValidationError

    from mmrag.settings import Settings

    given = overrides(ctx) | {k: v for k, v in extra.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        fatal(f"invalid setting: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}")


def fatal(message: str) -> NoReturn:
    """The one line a handled error prints (its details are in the run's log file)."""
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def run_flow(work_dir: str, flow_, *args, server: startup.TemporaryServer | None = None,
             **kwargs):
    """Run a flow with quiet terminal output (full logs in a file under ``work_dir/logs``); a
    Prefect server that cannot start is a one-line fatal error, not a traceback.

    ``server``: Prefect's temporary server as the command started it before importing its flow
    (``startup.start_server``), waited for here."""
    with output.quiet(work_dir, flow_.name):
        try:
            startup.ready(server)
            return flow_(*args, **kwargs)
        except RuntimeError as e:
            if "server" in str(e).lower() and "prefect" in str(e).lower():
                fatal(f"Prefect could not start or reach its server: {str(e).splitlines()[0]} "
                      "(raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or set "
                      "PREFECT_API_URL to a running server)")
            raise


def counts(mapping: dict) -> str:
    """``a=1, b=2`` (sorted), or ``none``."""
    return ", ".join(f"{k}={v}" for k, v in sorted(mapping.items())) or "none"
