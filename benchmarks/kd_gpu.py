"""GPU benchmark of the kd recipe's loss path: chunked fused head+KD vs TRL's GKD loss on full logits.

Random-initialised SmolLM2-135M-sized teacher (30 layers, hidden 576, vocab 49152) and a smaller student (every
third layer -> 10), bf16, sequence length 1024, generalised JSD (beta 0.5, T = 1) over every position, AdamW on the
student. Two variants run one after the other in the same process on the same batches:

* ``distillgate``: student/teacher decoder bodies -> hidden states -> ``chunked_kd_loss`` (full-vocabulary logits
  exist only for ``--chunk-size`` positions at a time, forward and backward fused);
* ``trl``: student/teacher ``forward`` -> full logits (B, T, V) -> ``trl.GKDTrainer.generalized_jsd_loss`` -- the
  loss GKDTrainer.compute_loss applies (with ``lmbda=0``, i.e. no on-policy generation step).

Prints tokens/s and peak CUDA memory per variant and the ratios (target: >= 1.5x TRL's tokens/s at <= its peak).
``trl`` is needed for the second variant only (``pip install trl``; it is not a project dependency); without it
that row is skipped. ``--device cpu --tiny`` is a smoke test of the script on a small config.

    python benchmarks/kd_gpu.py                      # H100/H200
    python benchmarks/kd_gpu.py --device cpu --tiny  # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from distillgate.train.config import LayerSubset
from distillgate.train.losses import DenseTeacher, chunked_kd_loss, reference_token_loss
from distillgate.train.student import decoder_and_head, layer_subset_student


def build(tiny: bool, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          tie_word_embeddings=True)
    else:  # SmolLM2-135M's shape
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                          rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = layer_subset_student(teacher, LayerSubset(every=3)).to(device=device, dtype=dtype)
    for p in student.parameters():
        p.requires_grad_(True)
    return teacher, student


def ours_step(teacher: Any, student: Any, chunk: int) -> Callable[[torch.Tensor], torch.Tensor]:
    s_body, s_head = decoder_and_head(student)
    t_body, t_head = decoder_and_head(teacher)

    def step(ids: torch.Tensor) -> torch.Tensor:
        inputs, labels = ids[:, :-1], ids[:, 1:]
        with torch.no_grad():
            th = t_body(input_ids=inputs).last_hidden_state  # (B, T, H)
        sh = s_body(input_ids=inputs).last_hidden_state  # (B, T, H)
        h = sh.reshape(-1, sh.shape[-1])  # (B*T, H)
        out = chunked_kd_loss(h, s_head, labels.reshape(-1), DenseTeacher(th.reshape(-1, th.shape[-1]), t_head),
                              kind="jsd", beta=0.5, temperature=1.0, chunk_size=chunk)
        return out.loss

    return step


def trl_step(teacher: Any, student: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        from trl import GKDTrainer
    except ImportError:  # trl >= 0.2x moved it to trl.experimental.gkd
        from trl.experimental.gkd import GKDTrainer

    def step(ids: torch.Tensor) -> torch.Tensor:
        inputs, labels = ids[:, :-1], ids[:, 1:]
        with torch.no_grad():
            t_logits = teacher(input_ids=inputs).logits  # (B, T, V)
        s_logits = student(input_ids=inputs).logits  # (B, T, V)
        loss: torch.Tensor = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=labels, beta=0.5,
                                                             temperature=1.0)
        return loss

    return step


def measure(name: str, step: Callable[[torch.Tensor], torch.Tensor], student: Any, batches: list[torch.Tensor],
            warmup: int, device: str) -> dict[str, Any]:
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    losses, tokens, seconds = [], 0, 0.0
    try:
        for i, ids in enumerate(batches):
            sync()
            t0 = time.perf_counter()
            loss = step(ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
            dt = time.perf_counter() - t0
            losses.append(float(loss.detach()))
            if i >= warmup:
                tokens += ids[:, :-1].numel()
                seconds += dt
    except torch.cuda.OutOfMemoryError as exc:
        return {"variant": name, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    del opt
    return {"variant": name, "tokens_per_s": round(tokens / seconds, 1), "peak_gib": peak and round(peak, 2),
            "first_loss": round(losses[0], 5), "last_loss": round(losses[-1], 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--out", help="also append the summary to this JSON-lines file")
    ap.add_argument("--variants", nargs="+", choices=("distillgate", "trl"), default=["distillgate", "trl"],
                    help="which loss paths to time (e.g. only ours at batch sizes TRL's full logits would not fit)")
    ap.add_argument("--profile", choices=("distillgate", "trl"),
                    help="instead of timing, profile 3 steps of this variant and print the top operators")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.tiny:
        args.seq, args.batch_size, args.steps, args.warmup = min(args.seq, 65), 2, 4, 1
    teacher, student0 = build(args.tiny, args.device, dtype)
    vocab = teacher.config.vocab_size
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (args.batch_size, args.seq + 1), generator=g).to(args.device)
               for _ in range(args.steps)]
    state = {k: v.clone() for k, v in student0.state_dict().items()}
    # The loss on the first batch in fp32 from full logits: which variant's bf16 loss is closer to it.
    with torch.no_grad():
        ids = batches[0]
        s_logits = student0(input_ids=ids[:, :-1]).logits.float()
        t_logits = teacher(input_ids=ids[:, :-1]).logits.float()
        reference = float(reference_token_loss(s_logits.reshape(-1, vocab), ids[:, 1:].reshape(-1),
                                               t_logits.reshape(-1, vocab), kind="jsd", beta=0.5))
        del s_logits, t_logits
    print(json.dumps({"reference_first_loss_fp32": round(reference, 5)}), flush=True)
    if args.profile:
        step = trl_step(teacher, student0) if args.profile == "trl" else ours_step(teacher, student0, args.chunk_size)
        opt = torch.optim.AdamW([p for p in student0.parameters() if p.requires_grad], lr=1e-5)
        for ids in batches[:2]:  # warm-up
            loss = step(ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            for ids in batches[2:5]:
                loss = step(ids)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        key = "self_device_time_total" if args.device.startswith("cuda") else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
        return
    results = []
    for name in args.variants:
        student0.load_state_dict(state)  # both variants start from the same student
        if name == "trl":
            try:
                step = trl_step(teacher, student0)
            except ImportError as exc:  # trl missing, or a trl that does not import with this transformers
                results.append({"variant": "trl", "error": f"trl does not import: {exc} (pip install trl)"})
                print(json.dumps(results[-1]), flush=True)
                continue
        else:
            step = ours_step(teacher, student0, args.chunk_size)
        results.append(measure(name, step, student0, batches, args.warmup, args.device))
        print(json.dumps(results[-1]), flush=True)
    summary: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                               "dtype": str(dtype), "batch_size": args.batch_size, "seq": args.seq, "chunk_size": args.chunk_size,
                               "teacher_layers": teacher.config.num_hidden_layers,
                               "student_layers": student0.config.num_hidden_layers,
                               "reference_first_loss_fp32": round(reference, 5), "results": results}
    ok = [r for r in results if "tokens_per_s" in r]
    if len(ok) == 2:
        ours, trl = ok
        summary["speedup_vs_trl"] = round(ours["tokens_per_s"] / trl["tokens_per_s"], 2)
        if ours["peak_gib"] and trl["peak_gib"]:
            summary["peak_memory_ratio_vs_trl"] = round(ours["peak_gib"] / trl["peak_gib"], 2)
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
