"""``lmforge generate``: complete prompts with a trained model (batched, streamed, optionally with --rag);
with ``--output``, a file of prompts as a resumable batch (``lmforge.batch_inference``, the code of the
``batch_inference`` asset)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from dagster_project.cli.common import app, PARAMS_HELP, fail, use_params
from lmforge.params import LmforgeError, load_params


@app.command()
def generate(
    prompts: Optional[list[str]] = typer.Argument(None, help="Prompt(s) to complete."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="Model directory, or MLflow URI (runs:/ID or runs:/ID/PATH, models:/NAME@ALIAS, models:/NAME/VERSION); default: the champion of `select` "
        "(with --output: params.yaml batch_inference.model, default models:/NAME@champion).",
    ),
    file: Optional[Path] = typer.Option(
        None, "--file", "-f",
        help="Prompts from a file: text, one per line ('-': standard input); or JSONL / CSV (params.yaml batch_inference.prompt_field, "
        "id_field, messages_field), which needs --output.",
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o",
        help="Batch mode, for --file: append one JSON object per prompt (id, prompt, completion, token counts, model) to this JSONL "
        "file after each batch; run the same command again to resume a killed run. Bad rows go to OUT.quarantine.jsonl; "
        "settings default to params.yaml batch_inference (docs/batch-inference.md).",
    ),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens to generate (default: params.yaml evaluate.sampling; with --output: batch_inference.sampling)."),
    temperature: Optional[float] = typer.Option(None, help="0: greedy; higher: more varied (default: params.yaml)."),
    top_k: Optional[int] = typer.Option(None, help="Sample among the k most likely tokens; 0: no limit."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass; 1.0: no limit."),
    repetition_penalty: Optional[float] = typer.Option(None, help="> 1 discourages repeats."),
    seed: Optional[int] = typer.Option(None, help="Random seed (sampled text is reproducible)."),
    batch_size: Optional[int] = typer.Option(None, help="Prompts generated together (without streaming); default 8 (with --output: batch_inference.batch_size)."),
    stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help="Print text as it is generated (default: on for one prompt)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per prompt: {prompt, completion} (and sources with --rag); with --output: the summary as JSON."),
    rag: bool = typer.Option(False, "--rag", help="Retrieve chunks of the corpus (the retrieval_index asset) into the prompt and cite them."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Chunks retrieved with --rag (default: params.yaml rag.top_k)."),
    chat: Optional[bool] = typer.Option(
        None, "--chat/--no-chat",
        help="Send each prompt as a user message through the model's chat template and print the assistant's answer. "
        "Default: on when the model's tokenizer has a chat template (instruct models), off otherwise; "
        "--no-chat completes the raw text.",
    ),
    params: Optional[Path] = typer.Option(None, help=PARAMS_HELP),
) -> None:
    """Complete prompts with a trained model: batched, KV cache, greedy or sampled, streamed;
    with --rag, grounded in retrieved chunks of your corpus, which it cites.  An instruct model (one
    whose tokenizer has a chat template) is asked in its chat format unless --no-chat.  With --output,
    a file of prompts (JSONL, CSV or text) is completed as a resumable batch, like the batch_inference asset."""
    use_params(params)
    try:
        p = load_params()
        overrides = {k: v for k, v in dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                            repetition_penalty=repetition_penalty, seed=seed).items() if v is not None}
        if output is not None or (file is not None and file.suffix.lower() in BATCH_SUFFIXES):
            if output is None:
                fail(f"--file {file}: JSONL and CSV prompts are completed into a file: add --output OUT.jsonl")
            if file is None or str(file) == "-":
                fail("--output needs --file PROMPTS (a file: a resumed run reads it again)")
            if prompts or rag or stream:
                fail("--output completes the prompts of --file only: leave out prompt arguments, --rag and --stream")
            _batch(p, file, output, model, batch_size, chat, overrides, as_json)
            return
        texts = list(prompts or [])
        if file is not None:
            lines = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
            texts += [line for line in lines.splitlines() if line.strip()]
        if not texts:
            fail("no prompt: give one as an argument or --file FILE")
        try:
            sampling = dataclasses.replace(p.evaluate.sampling, **overrides)
        except ValueError as exc:
            fail(str(exc))
        from lmforge.batch_inference import chat_mode, complete_prompts, load_model
        from lmforge.finetune import champion
        from lmforge.tracking import tracking_uri

        if model is None and not (p.stage_dir("select") / "summary.json").exists():
            fail("no --model given and no champion yet: materialize 'select' (lmforge run --select select) or pass --model")
        ref = model or str(champion(p)[1])
        lm, tokenizer, _version = load_model(ref, tracking_uri(p))
        chat = chat_mode("auto" if chat is None else chat, tokenizer, ref, option="--chat")
        sources: list[list[dict]] = [[] for _ in texts]
        questions = texts
        if rag:
            from lmforge.rag import with_retrieval

            texts, sources = with_retrieval(p, texts, chunks or p.rag.top_k, tokenizer, sampling.max_new_tokens)
        streaming = (len(texts) == 1 and not as_json) if stream is None else stream
        if streaming:
            current = [-1]

            def show(i: int, piece: str) -> None:
                if i != current[0]:
                    current[0] = i
                    # a chat answer starts a line of its own; a completion continues the prompt's text
                    typer.secho(("" if i == 0 else "\n") + questions[i], bold=True, nl=bool(chat))
                typer.echo(piece, nl=False)

            outputs = complete_prompts(lm, tokenizer, texts, sampling, batch_size or 8, chat=chat, on_text=show)
            typer.echo()
            _cite(sources[0] if len(texts) == 1 else [])
        else:
            outputs = complete_prompts(lm, tokenizer, texts, sampling, batch_size or 8, chat=chat)
        if as_json:
            for prompt, completion, used in zip(questions, outputs, sources):
                record = {"prompt": prompt, "completion": completion}
                if rag:
                    record["sources"] = [{"id": c["id"], "path": c["path"]} for c in used]
                typer.echo(json.dumps(record, ensure_ascii=False))
        elif not streaming:
            for prompt, completion, used in zip(questions, outputs, sources):
                typer.secho(prompt, bold=True, nl=bool(chat))
                typer.echo(completion)
                _cite(used)
                typer.echo()
    except LmforgeError as exc:
        fail(str(exc))


#: --file suffixes read as records (JSONL, CSV): batch mode, with --output.
BATCH_SUFFIXES = (".jsonl", ".ndjson", ".csv")


def _batch(p, file: Path, output: Path, model: Optional[str], batch_size: Optional[int], chat: Optional[bool],
           overrides: dict, as_json: bool) -> None:
    """``--file F --output OUT.jsonl``: ``lmforge.batch_inference.run_batch`` with params.yaml's
    ``batch_inference`` and the options given; progress on stderr, the summary on stdout."""
    from lmforge.batch_inference import Outputs, run_batch
    from lmforge.tracking import tracking_uri

    if not file.is_file():
        fail(f"--file {file}: no such file")
    if output.resolve() == file.resolve():
        fail("--output must be another file than --file")
    settings = p.batch_inference
    try:
        settings = dataclasses.replace(
            settings, model=model or settings.model, batch_size=batch_size or settings.batch_size,
            chat=settings.chat if chat is None else chat, sampling=dataclasses.replace(settings.sampling, **overrides),
        )
    except ValueError as exc:
        fail(str(exc))
    summary = run_batch(settings, file, Outputs.beside(output), registry_name=p.registry.name, tracking_uri=tracking_uri(p),
                        report=lambda message: typer.echo(message, err=True))
    if as_json:
        typer.echo(json.dumps(summary, sort_keys=True))
    else:
        typer.echo(f"{output}: {summary['completed']} of {summary['prompts']} prompts completed ({summary['resumed']} resumed, "
                   f"{summary['quarantined']} quarantined) · {summary['generated_tokens']} tokens in {summary['seconds']:.1f} s "
                   f"= {summary['tokens_per_second']} tokens/s at batch {summary['batch_size']}")


def _cite(chunks: list[dict]) -> None:
    if chunks:
        typer.secho("sources: " + "; ".join(f"[{n}] {c['id']} ({c['path']})" for n, c in enumerate(chunks, 1)), dim=True)
