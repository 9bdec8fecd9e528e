"""``lmforge serve``: the OpenAI-compatible server (``lmforge.serve``) for a registered model or a directory."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import typer

from dagster_project.cli.common import PARAMS_HELP, app, fail, use_params
from lmforge.params import LmforgeError, load_params


@app.command()
def serve(
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Model directory or MLflow URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID); "
        "default: params.yaml serve.model, else models:/<registry.name>@champion.",
    ),
    host: Optional[str] = typer.Option(None, help="Address to bind (default: params.yaml serve.host, 127.0.0.1). "
                                       "Any address other than a loopback one requires an API key."),
    port: Optional[int] = typer.Option(None, help="Port (default: params.yaml serve.port)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LMFORGE_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on /v1/*."),
    served_name: Optional[str] = typer.Option(None, "--served-name", help="The model id clients send (default: NAME@ALIAS or the directory's name)."),
    max_batch_size: Optional[int] = typer.Option(None, help="Concurrent requests generated together (default: params.yaml serve.max_batch_size)."),
    batch_wait_ms: Optional[float] = typer.Option(None, help="How long a dynamic batch's first request waits for others (default: params.yaml)."),
    engine: Optional[str] = typer.Option(None, help="dynamic (requests in dynamic batches), continuous (greedy requests by "
                                         "continuous batching, sampled ones in dynamic batches) or onnx (greedy requests by ONNX "
                                         "Runtime GenAI, the fastest single stream); default: params.yaml serve.engine."),
    params: Optional[Path] = typer.Option(None, help=PARAMS_HELP),
) -> None:
    """Serve a model behind the OpenAI API: /v1/models, /v1/completions, /v1/chat/completions (streaming), /v1/feedback, /health.

    Any OpenAI client works, e.g. `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")`.
    Every answer and feedback is recorded in params.yaml feedback.store (docs/serving.md).
    """
    use_params(params)
    try:
        p = load_params()
        if engine not in (None, "continuous", "dynamic", "onnx"):
            fail(f"--engine: dynamic, continuous or onnx, not {engine!r}")
        overrides = {k: v for k, v in dict(max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, engine=engine).items() if v is not None}
        try:
            settings = dataclasses.replace(p.serve, **overrides)
        except ValueError as exc:  # e.g. --max-batch-size 0
            fail(str(exc))
        host = host or settings.host
        from lmforge.serve import AliasFollower, create_app, is_loopback, load_served

        if api_key is None and not is_loopback(host):
            fail(f"--host {host} makes the server reachable from other machines: give an API key (--api-key or $LMFORGE_API_KEY)")
        import uvicorn

        from lmforge.feedback_store import FeedbackStore
        from lmforge.registry import is_alias
        from lmforge.tracking import tracking_uri

        ref = model or settings.model or f"models:/{p.registry.name}@champion"
        typer.echo(f"loading {ref} ...")
        onnx = settings.onnx_precision if settings.engine == "onnx" else None
        if onnx:
            typer.echo(f"engine onnx: the {onnx} ONNX model of {ref} (built once if the registry version has none) ...")
        served = load_served(ref, tracking_uri(p), served_name, onnx)
        store = FeedbackStore(p.path(p.feedback.store))
        follows = is_alias(ref) and settings.follow_seconds > 0
        app_ = create_app(served, store, settings, api_key=api_key, sampling_defaults=p.evaluate.sampling,
                          follow=AliasFollower(ref, tracking_uri(p), served_name, onnx) if follows else None)
        where = f"http://{host}:{port or settings.port}"
        typer.echo(f"serving '{served.name}'{f' (version {served.version})' if served.version else ''} at {where}/v1 "
                   f"(feedback store {store.path}){'; API key required' if api_key else ''}"
                   f"{f'; following {ref} every {settings.follow_seconds:g} s' if follows else ''}")
        uvicorn.run(app_, host=host, port=port or settings.port, log_level=os.environ.get("LMFORGE_SERVE_LOG_LEVEL", "info"))
    except LmforgeError as exc:
        fail(str(exc))
