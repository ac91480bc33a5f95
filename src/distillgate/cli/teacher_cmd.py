"""``distillgate teacher ...``: look at a local teacher (one chat completion, its card)."""

from __future__ import annotations

import json
import os

import click

from distillgate.teachers.loading import DEFAULT_MODEL


@click.group("teacher")
def cli() -> None:
    """Talk to a teacher model (the offline local SmolLM2 by default)."""


def _threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


@cli.command("chat")
@click.argument("prompt")
@click.option("--model", "model", default=DEFAULT_MODEL, show_default=True,
              help="local/smollm2-135m-instruct, a .gguf file or a Hugging Face model directory.")
@click.option("--system", "system", default=None, help="A system message to send first.")
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(0.0, 2.0), default=0.0, show_default=True,
              help="0 means greedy decoding.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Makes sampling reproducible.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole chat.completion object.")
def chat(prompt: str, model: str, system: str | None, max_tokens: int, temperature: float, top_p: float,
         seed: int | None, as_json: bool) -> None:
    """Print one completion of PROMPT from a teacher."""
    from distillgate.teachers import wire
    from distillgate.teachers.engine import SamplingParams
    from distillgate.teachers.registry import load_local_model

    engine = load_local_model(model, threads=_threads())
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    gens = engine.generate([messages], params)
    if as_json:
        sha = engine.card().file_sha256 or "unknown"
        click.echo(json.dumps(wire.chat_response(engine.model_name, f"dg-{sha[:12]}", gens), indent=2))
    else:
        click.echo(gens[0].text)


@cli.command("card")
@click.option("--model", "model", default=DEFAULT_MODEL, show_default=True,
              help="local/smollm2-135m-instruct, a .gguf file or a Hugging Face model directory.")
def card(model: str) -> None:
    """Print the teacher card (model id, file hash, quantisation, template hash, parameter count) as JSON."""
    from distillgate.teachers.registry import load_local_model

    engine = load_local_model(model, threads=_threads())
    click.echo(json.dumps(engine.card().as_dict(), indent=2))
