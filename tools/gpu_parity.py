"""Our megatron-core Qwen2 against transformers' on one device: logits in fp32 and bf16, gradients in fp32.

    python tools/gpu_parity.py                      # GPU: 0.5B layer shape + an MoE shape, 2 layers each
    python tools/gpu_parity.py --device cpu --small  # CPU smoke run on narrow shapes

For each model a randomly initialised transformers model is saved (fp32 safetensors) and loaded
into our model with the converter's load_hf_weights (the path qwen2-convert uses); both run the
same random tokens through torch SDPA attention. Checks:
- fp32 logits: max |ours - hf| <= --fp32-tol (default 2e-3);
- fp32 gradients (dense): max |ours - hf| <= --grad-tol (default 1e-3) x the largest gradient;
- bf16 logits: our bf16 error against the fp32 reference is at most --bf16-factor (default 1.5)
  times transformers' own bf16 error, plus a small floor (bf16 rounding differs between any two
  implementations, so "as accurate as transformers" is the criterion), both in mean and in loss;
- fast paths (dense): bf16 loss and gradients of our model with each fast path (Liger kernels
  and compiled layers with Liger's SwiGLU inside when liger-kernel is installed, compiled layers,
  the fused LM loss eager, compiled, and compiled
  with its gradients computed in forward and added into main_grad, weight-
  gradient accumulation into main_grad alone and with compiled layers + fused LM loss) against
  the fp32 reference are within --bf16-factor of the plain bf16 path's error (relative L2 over
  all gradients), plus a small floor.
Prints one line per check, a JSON summary as the last line (--json-out appends it to a file),
and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import _REPO, hf_model_config  # noqa: E402,F401  (also puts the repo on sys.path)


def shapes(small: bool) -> dict[str, Any]:
    from qwen2_megatron.model.presets import get_preset
    from qwen2_megatron.model.shape import Qwen2Shape

    if small:
        dense = Qwen2Shape(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
        moe = Qwen2Shape(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=32, shared_expert_intermediate_size=64)
    else:
        dense = replace(get_preset("qwen2_0.5b"), num_hidden_layers=2)
        # Qwen2-57B-A14B's head size (128), GQA and untied head, narrower and with fewer experts.
        moe = Qwen2Shape(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=151936, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=512, shared_expert_intermediate_size=1024)
    return {"dense": dense, "moe": moe}


def save_random_hf(shape: Any, path: Path, seed: int) -> None:
    """A random transformers model of this shape, with non-trivial norms and biases, in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_model_config(shape), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)


def hf_run(path: Path, dtype: Any, tokens: Any, labels: Any, device: Any, grads: bool) -> tuple[Any, float, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    with torch.set_grad_enabled(grads):
        logits = model(tokens, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    out_grads = {}
    if grads:
        loss.backward()
        out_grads = {n: p.grad.detach().float() for n, p in model.named_parameters() if p.grad is not None}
    result = logits.detach().float(), float(loss), out_grads
    del model
    return result


def ours_grads(path: Path, precision: str, tokens: Any, labels: Any, runtime: Any, fast: Any = None,
               fused: Any = None, wgrad_fusion: bool = False) -> tuple[float, dict]:
    """Loss and gradients (HF names) of our model after one forward + backward, with the given
    fast paths and LM loss (a FusedLMLoss, or None: megatron's output layer + cross-entropy), and
    with weight gradients accumulated into main_grad by the layers (train.grad_accum_fusion)."""
    import torch

    from qwen2_megatron.convert.hf_io import HFCheckpoint, gather_hf_state, load_hf_weights
    from qwen2_megatron.model.builder import build_model
    from qwen2_megatron.model.forward import forward_backward
    from qwen2_megatron.model.wgrad_accumulation import enable_wgrad_accumulation_fusion
    from qwen2_megatron.parallel.ddp import wrap_ddp

    if wgrad_fusion:
        enable_wgrad_accumulation_fusion()
    ckpt = HFCheckpoint(path)
    chunks = wrap_ddp(build_model(ckpt.shape, runtime.layout, precision, perform_initialization=False, fast=fast,
                                  gradient_accumulation_fusion=wgrad_fusion))
    load_hf_weights([c.module for c in chunks], ckpt)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones_like(labels, dtype=torch.float32)}
    losses = forward_backward(chunks, [batch], fused_loss=fused)
    loss = float(losses[0]["lm loss"])
    grads = {k: v.float() for k, v in gather_hf_state([c.module for c in chunks], ckpt.shape, grads=True).items()}
    del chunks
    return loss, grads


def grad_error(grads: dict, ref: dict) -> float:
    """||grads - ref|| / ||ref|| over all gradients together."""
    diff = sum(float((grads[k] - g).double().pow(2).sum()) for k, g in ref.items())
    return math.sqrt(diff / sum(float(g.double().pow(2).sum()) for g in ref.values()))


def ours_run(path: Path, precision: str, tokens: Any, labels: Any, runtime: Any, grads: bool) -> tuple[Any, float, dict]:
    import torch

    from qwen2_megatron.convert.hf_io import HFCheckpoint, load_hf_weights
    from qwen2_megatron.model.builder import build_model
    from qwen2_megatron.model.forward import forward_logits

    ckpt = HFCheckpoint(path)
    chunks = build_model(ckpt.shape, runtime.layout, precision, parallel_output=False, perform_initialization=False)
    load_hf_weights(chunks, ckpt)
    for chunk in chunks:
        chunk.eval()
    logits = forward_logits(chunks, tokens).float()
    loss = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))
    del chunks
    out_grads = ours_grads(path, precision, tokens, labels, runtime)[1] if grads else {}
    return logits, loss, out_grads


def check_fast_paths(path: Path, tokens: Any, labels: Any, runtime: Any, ref_grads: dict, ref_loss: float,
                     args: argparse.Namespace, check: Any) -> None:
    """Each fast path in bf16 is as close to the fp32 reference as the plain bf16 path."""
    import torch

    from qwen2_megatron.model import liger
    from qwen2_megatron.model.fast_paths import FastPaths
    from qwen2_megatron.model.fused_loss import FusedLMLoss

    plain_loss, plain = ours_grads(path, "bf16", tokens, labels, runtime)
    plain_err = grad_error(plain, ref_grads)
    print(f"     dense bf16 plain path vs fp32 reference: grads rel-L2 {plain_err:.3e}, loss {plain_loss - ref_loss:+.3e}")
    variants = {"compiled layers": (FastPaths(compile="layers"), None, False),
                "fused LM loss": (FastPaths(), FusedLMLoss(), False),
                "compiled fused LM loss": (FastPaths(), FusedLMLoss(compiled=True), False),
                "compiled fused LM loss, gradients in forward + weight-gradient fusion": (
                    FastPaths(), FusedLMLoss(compiled=True, grad_in_forward=True), True),
                "weight-gradient fusion": (FastPaths(), None, True),
                "compiled layers + fused LM loss + weight-gradient fusion": (
                    FastPaths(compile="layers"), FusedLMLoss(), True)}
    if liger.available():
        variants = {"liger kernels": (FastPaths(liger=liger.KERNELS), None, False),
                    "compiled layers + Liger SwiGLU": (FastPaths(liger=liger.WITH_COMPILED_LAYERS, compile="layers"),
                                                       None, False), **variants}
    else:
        print("     liger-kernel not installed: Liger kernels not checked")
    for label, (fast, fused, wgrad_fusion) in variants.items():
        loss, grads = ours_grads(path, "bf16", tokens, labels, runtime, fast, fused, wgrad_fusion)
        check(f"dense bf16 {label} grads", grad_error(grads, ref_grads), args.bf16_factor * plain_err + 1e-3,
              "rel-L2 |fast_bf16 - hf_fp32|")
        check(f"dense bf16 {label} loss", abs(loss - ref_loss), args.bf16_factor * abs(plain_loss - ref_loss) + 1e-2,
              f"|fast_bf16 - hf_fp32| (plain bf16 {plain_loss:.4f})")
        del grads
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--small", action="store_true", help="narrow shapes (CPU smoke run)")
    p.add_argument("--models", default="dense,moe")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--fp32-tol", type=float, default=2e-3)
    p.add_argument("--grad-tol", type=float, default=1e-3)
    p.add_argument("--bf16-factor", type=float, default=1.5)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from qwen2_megatron.parallel.layout import ParallelLayout
    from qwen2_megatron.parallel.runtime import init_runtime, shutdown_runtime

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    runtime = init_runtime(ParallelLayout())
    device = runtime.device
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float, limit: float, what: str) -> None:
        ok = math.isfinite(value) and value <= limit
        checks.append({"check": name, "value": value, "limit": limit, "ok": ok})
        print(f"{'PASS' if ok else 'FAIL'} {name}: {what} {value:.3e} (limit {limit:.3e})", flush=True)

    try:
        with tempfile.TemporaryDirectory(prefix="gpu-parity-") as tmp:
            for name, shape in shapes(args.small).items():
                if name not in args.models.split(","):
                    continue
                path = Path(tmp) / name
                save_random_hf(shape, path, seed=3)
                gen = torch.Generator().manual_seed(5)
                tokens = torch.randint(0, shape.vocab_size, (args.batch, args.seq), generator=gen).to(device)
                labels = torch.randint(0, shape.vocab_size, (args.batch, args.seq), generator=gen).to(device)
                dense = not shape.is_moe  # transformers 5 keeps MoE experts fused: compare dense gradients only
                ref, ref_loss, ref_grads = hf_run(path, torch.float32, tokens, labels, device, grads=dense)
                ours32, ours32_loss, ours32_grads = ours_run(path, "fp32", tokens, labels, runtime, grads=dense)
                scale = ref.abs().max().item()
                check(f"{name} fp32 logits", (ours32 - ref).abs().max().item(), args.fp32_tol,
                      f"max |ours - hf| (largest logit {scale:.2f})")
                check(f"{name} fp32 loss", abs(ours32_loss - ref_loss), args.fp32_tol, f"|ours - hf| (hf {ref_loss:.4f})")
                if dense:
                    assert sorted(ours32_grads) == sorted(ref_grads), "gradient names differ"
                    worst = max((ours32_grads[k] - g).abs().max().item() for k, g in ref_grads.items())
                    largest = max(g.abs().max().item() for g in ref_grads.values())
                    check(f"{name} fp32 grads", worst / largest, args.grad_tol, "max |ours - hf| / largest gradient")
                del ours32, ours32_grads
                if dense:
                    check_fast_paths(path, tokens, labels, runtime, ref_grads, ref_loss, args, check)
                del ref_grads
                hf16, hf16_loss, _ = hf_run(path, torch.bfloat16, tokens, labels, device, grads=False)
                ours16, ours16_loss, _ = ours_run(path, "bf16", tokens, labels, runtime, grads=False)
                hf_err, ours_err = (hf16 - ref).abs().mean().item(), (ours16 - ref).abs().mean().item()
                print(f"     {name} bf16 logits vs fp32 reference: mean |err| ours {ours_err:.3e}, hf {hf_err:.3e}; "
                      f"max ours {(ours16 - ref).abs().max().item():.3e}, hf {(hf16 - ref).abs().max().item():.3e}")
                check(f"{name} bf16 logits", ours_err, args.bf16_factor * hf_err + 2e-4 * scale,
                      "mean |ours_bf16 - hf_fp32|")
                check(f"{name} bf16 loss", abs(ours16_loss - ref_loss),
                      args.bf16_factor * abs(hf16_loss - ref_loss) + 1e-2, f"|ours_bf16 - hf_fp32| (hf_bf16 {hf16_loss:.4f})")
                del hf16, ours16, ref
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        shutdown_runtime()
    failed = [c["check"] for c in checks if not c["ok"]]
    summary = {"parity": checks, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "failed": failed}
    line = json.dumps(summary)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json_out, "a", encoding="utf-8") as stream:
            stream.write(line + "\n")
    print(f"parity: {len(checks) - len(failed)} of {len(checks)} checks passed" + (f"; FAILED: {failed}" if failed else ""))
    print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
