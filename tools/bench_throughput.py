"""Training throughput of our megatron-core stack beside Hugging Face transformers, on one device.

    python tools/bench_throughput.py --preset qwen2_1.5b --micro-batch 4            # GPU
    python tools/bench_throughput.py --preset qwen2_7b --layers 8 --micro-batch 2
    python tools/bench_throughput.py --device cpu --preset tiny --seq 64 --steps 2   # fp32, eager

Both sides train the same shape (a preset, optionally cut to --layers N and changed with
--override model.FIELD=VALUE) on the same batches, one after the other in this process, with
memory freed between them. The batches (--data random: random token ids; --data demo: the demo
corpus through our data pipeline, which needs the `datasets` package) are made before timing, so
data loading is not measured. Defaults: bf16 and torch.compile on GPU; fp32 and eager on CPU
(--dtype, --compile/--no-compile).

- ours: the Trainer (train/trainer.py) at world size 1, built exactly as qwen2-train builds it
  (runtime, megatron-core model from our builder, megatron DDP, megatron's distributed
  optimizer, forward_backward through megatron's schedule, the guarded optimizer step), with
  bf16 parameters and fp32 master weights (train.precision=bf16). Each timed step is
  Trainer.train_step(); only the data loader is replaced by the pre-made batches.
- hf: transformers' Qwen2ForCausalLM / Qwen2MoeForCausalLM from the same shape (Qwen2Shape ->
  config.json), attn_implementation="sdpa", torch.compile(model), fused AdamW (weight decay
  on matrices only, as ours), gradient clipping at 1.0 (as HF's Trainer does), the loss from the
  model on ours' targets (the next token at every position: shift_labels). Precision
  --hf-precision: "bf16" = bf16 parameters, gradients and Adam state, no fp32 master weights
  (the strongest peer in ../shared/reference/performance.md; the default) or "autocast" = fp32
  parameters under torch.autocast(bf16). MoE models train with the router's load-balancing loss
  (output_router_logits=True), as ours does.

Levers of our stack go through generic overrides, so fields added later work unchanged:
--override SECTION.FIELD=VALUE sets any TrainerConfig field (train.recompute=selective,
train.fused_lm_loss=true, optim.distributed_optimizer=false, model.num_experts=16,
train.liger_kernels=[rms_norm,swiglu,rope], train.compile=layers, or a field another change adds;
--recompute and --fused-loss are shorthands), and
--mcore FIELD=VALUE adds a megatron-core TransformerConfig field to the Trainer's build_model
call (e.g. cross_entropy_loss_fusion=true). An unknown --override key fails before anything runs.

Reported per side: tokens/s (from the median step time of --steps steps after --warmup warm-up
steps), TFLOP/s per device and MFU by performance.md's convention (model.params.
training_flops_per_token and train.metrics' peak table; --peak-tflops overrides), step time,
peak memory (torch.cuda.max_memory_allocated, reset before each side; on CPU the process's peak
RSS, not reset), first and last loss; then ours/hf ratios and one JSON line (the last line of
stdout; --json-out appends it to a file too; `bench_throughput.py --summarize FILE` tabulates
such a file). A side that runs out of memory is reported as such and the other side still
runs. Exit status: 1 if a side failed for another reason, else 0. The two sides start from
their own random initialisations (megatron's and transformers'), so their losses differ; with
--same-init ours starts from transformers' initial weights (imported by our HF converter) and
the per-step losses in the JSON line are comparable.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

PRESET_NAMES = ("qwen2_0.5b", "qwen2_1.5b", "qwen2_7b", "qwen2_72b", "qwen2_57b_a14b", "tiny", "tiny_moe")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key.strip(), value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2_0.5b", choices=PRESET_NAMES)
    p.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps (not measured; include compilation)")
    p.add_argument("--data", choices=("random", "demo"), default="random",
                   help="random token ids, or real text through our data pipeline (the demo corpus)")
    p.add_argument("--only", choices=("ours", "hf"), default=None)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="bf16 (default on GPU): ours train.precision=bf16, hf per --hf-precision; "
                        "fp32 (default on CPU, where bf16 is emulated and slow): both sides fp32")
    p.add_argument("--hf-precision", choices=("bf16", "autocast"), default="bf16")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the HF model (default: on GPU yes, on CPU no)")
    p.add_argument("--hf-config", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="set an attribute of the HF config (YAML value), e.g. experts_implementation=eager")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default=None,
                   help="shorthand for --override train.recompute=...")
    p.add_argument("--fused-loss", action="store_true",
                   help="shorthand for --override train.fused_lm_loss=true (fused output layer + cross-entropy)")
    p.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="a TrainerConfig field (repeatable); model.* fields change the shape of both sides")
    p.add_argument("--mcore", type=_key_value, action="append", default=[], metavar="FIELD=VALUE",
                   help="a megatron-core TransformerConfig field for our model (YAML value; repeatable)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: known GPUs)")
    p.add_argument("--json-out", type=Path, default=None, help="also append the JSON line to this file")
    p.add_argument("--label", default=None, help="a name for this case in the JSON line")
    p.add_argument("--same-init", action="store_true",
                   help="start ours from transformers' initial weights (saved, then imported with our HF "
                        "converter) so that both sides' losses are comparable step by step")
    p.add_argument("--profile", type=Path, default=None, metavar="FILE",
                   help="after timing, profile 2 more steps of each side with torch.profiler: print the "
                        "kernels that take the most device time and write the whole table to FILE.SIDE.txt")
    args = p.parse_args(argv)
    for name in ("seq", "micro_batch", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or (args.layers is not None and args.layers < 1):
        p.error("--warmup must be >= 0 and --layers >= 1")
    if args.same_init and args.only is not None:
        p.error("--same-init needs both sides (ours starts from transformers' initial weights); drop --only")
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.compile is None:
        args.compile = args.device == "cuda"
    if args.recompute:
        args.override.append(f"train.recompute={args.recompute}")
    if args.fused_loss:
        args.override.append("train.fused_lm_loss=true")
    if args.layers:
        args.override.insert(0, f"model.num_hidden_layers={args.layers}")
    return args


def _yaml_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


# ----- configuration -----------------------------------------------------------------------------


def trainer_config(args: argparse.Namespace, work: Path) -> Any:
    """The TrainerConfig our side runs (and whose model section both sides train)."""
    from omegaconf import OmegaConf

    from qwen2_megatron.checkpoint.config import CheckpointConfig
    from qwen2_megatron.data.demo import demo_mixture
    from qwen2_megatron.model.presets import get_preset
    from qwen2_megatron.train.config import LogConfig, OptimConfig, RunConfig, TrainConfig, TrainerConfig

    steps = args.warmup + args.steps
    cfg = TrainerConfig(
        model=get_preset(args.preset),
        train=TrainConfig(
            steps=steps, global_batch_size=args.micro_batch, micro_batch_size=args.micro_batch,
            seq_length=args.seq, seed=args.seed, precision=args.dtype,
        ),
        optim=OptimConfig(lr=args.lr, min_lr=args.lr, schedule="constant", warmup_steps=0),
        # The trainer needs a mixture to build its loader; the benchmark feeds pre-made batches.
        data=demo_mixture(num_workers=0),
        log=LogConfig(interval=steps, progress_bar=False, peak_tflops=args.peak_tflops),
        run=RunConfig(dir=str(work / "run"), name="bench"),
        checkpoint=CheckpointConfig(dir=str(work / "checkpoints"), interval=0, resume="none", save_at_end=False),
    )
    if args.override:
        merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(list(args.override)))
        cfg = OmegaConf.to_object(merged)
    return cfg


def hf_model_config(shape: Any, **changes: Any) -> Any:
    """A transformers config object (Qwen2Config / Qwen2MoeConfig) for a Qwen2Shape."""
    from transformers import AutoConfig

    fields = shape.to_hf_config()
    fields.pop("dtype", None)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


# ----- data --------------------------------------------------------------------------------------


def make_batches(args: argparse.Namespace, cfg: Any, device: Any) -> list[dict[str, Any]]:
    """Distinct micro-batches {"tokens", "labels", "loss_mask"} on the device (cycled through)."""
    import torch

    count = min(args.warmup + args.steps, 8)
    shape = cfg.model
    if args.data == "random":
        from qwen2_megatron.data.tokenizer import QWEN2_VOCAB_SIZE

        gen = torch.Generator().manual_seed(args.seed)
        high = min(shape.vocab_size, QWEN2_VOCAB_SIZE)
        batches = []
        for _ in range(count):
            window = torch.randint(0, high, (args.micro_batch, args.seq + 1), generator=gen)
            batches.append({"tokens": window[:, :-1].contiguous(), "labels": window[:, 1:].contiguous(),
                            "loss_mask": torch.ones(args.micro_batch, args.seq)})
    else:
        from qwen2_megatron.data.loader import build_data_loader

        loader = build_data_loader(cfg.data, None, args.seq, args.micro_batch, model_vocab_size=shape.vocab_size)
        try:
            batches = [next(loader) for _ in range(count)]
        finally:
            loader.close()
    return [{k: v.to(device) for k, v in b.items() if k in ("tokens", "labels", "loss_mask")} for b in batches]


class _Feed:
    """Stands in for the trainer's data loader: cycles through pre-made batches."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches, self.i = batches, 0

    def __iter__(self) -> "_Feed":
        return self

    def __next__(self) -> dict[str, Any]:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def close(self) -> None:
        pass


# ----- timing ------------------------------------------------------------------------------------


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable[[int], float], args: argparse.Namespace, device: Any, side: str) -> dict[str, Any]:
    """Run warm-up + measured steps; per-step wall times of the measured ones and the losses."""
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        loss = step(i)
        _sync(device)
        seconds = time.perf_counter() - start
        losses.append(loss)
        if i >= args.warmup:
            times.append(seconds)
        if i == 0:
            print(f"  first step {seconds:.2f} s (loss {loss:.4f})", flush=True)
    if args.profile is not None:
        profile_steps(step, args.warmup + args.steps, args.profile.with_name(f"{args.profile.name}.{side}.txt"), device)
    return {"times": times, "losses": losses}


def profile_steps(step: Callable[[int], float], first: int, out: Path, device: Any) -> None:
    """Two more steps under torch.profiler: where a step's device time goes, kernel by kernel, and
    where the device waits between kernels (device_gaps.py)."""
    from torch.profiler import ProfilerActivity, profile

    from device_gaps import from_profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(first, first + 2):
            step(i)
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=70)
    try:
        gaps = from_profiler(prof)
    except Exception as exc:  # a diagnostic; it must not cost the case its measured numbers
        gaps = f"device idle gaps: not computed ({exc!r})"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{table}\n{gaps}\n")
    print(f"  profile of 2 steps ({out}), top kernels:")
    print("\n".join(table.splitlines()[:28]), flush=True)
    print("\n".join(gaps.splitlines()[:4]), flush=True)


def summarize(run: dict[str, Any], tokens_per_step: int, flops_per_token: float, peak: float | None) -> dict[str, Any]:
    times = run["times"]
    median = statistics.median(times)
    tokens_per_s = tokens_per_step / median
    tflops = tokens_per_s * flops_per_token / 1e12
    return {
        "tokens_per_s": tokens_per_s,
        "tflops_per_device": tflops,
        "mfu": tflops / peak if peak else None,
        "step_time_s": median,
        "step_time_mean_s": statistics.fmean(times),
        "step_time_min_s": min(times),
        "loss_first": run["losses"][0],
        "loss_last": run["losses"][-1],
        "losses": run["losses"],
    }


def _memory_start(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _free(device: Any) -> float | None:
    """Collect garbage and return cached memory to the device; GiB still allocated (GPU)."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated() / 2**30
    return None


# ----- the two sides -----------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, cfg: Any, batches: list[dict[str, Any]], device: Any) -> dict[str, Any]:
    import qwen2_megatron.train.trainer as trainer_module
    from qwen2_megatron.parallel.runtime import shutdown_runtime
    from qwen2_megatron.train.metrics import peak_memory_gib

    extra = {key: _yaml_value(value) for key, value in args.mcore}
    build = trainer_module.build_model
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    trainer = None
    try:
        if extra:
            trainer_module.build_model = lambda *a, **k: build(*a, **{**k, **extra})
        _memory_start(device)
        trainer = trainer_module.Trainer(cfg)
        for sig, handler in handlers.items():  # the trainer defers SIGTERM to train(); a benchmark must stop
            signal.signal(sig, handler)
        trainer.loader.close()
        trainer.loader = _Feed(batches)
        params = sum(p.numel() for chunk in trainer.model for p in chunk.module.parameters())
        print(f"  ours: {params:,} parameters, built; training", flush=True)
        run = time_steps(lambda i: trainer.train_step()["loss"], args, device, "ours")
        run["params"] = params
        run["peak_memory_gib"] = peak_memory_gib()
        return run
    finally:
        trainer_module.build_model = build
        if trainer is not None:
            trainer.close()
        del trainer
        shutdown_runtime()


def run_hf(args: argparse.Namespace, cfg: Any, batches: list[dict[str, Any]], device: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from qwen2_megatron.train.metrics import peak_memory_gib

    shape = cfg.model
    changes: dict[str, Any] = {"use_cache": False}
    if shape.is_moe:
        changes["output_router_logits"] = True  # train the load-balancing loss, as ours does
    changes.update({key: _yaml_value(value) for key, value in args.hf_config})
    config = hf_model_config(shape, **changes)
    bf16_params = args.dtype == "bf16" and args.hf_precision == "bf16"
    autocast = args.dtype == "bf16" and args.hf_precision == "autocast"
    _memory_start(device)
    torch.manual_seed(args.seed)
    with device:
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", dtype=torch.bfloat16 if bf16_params else torch.float32
        )
    model.to(device).train()
    if args.same_init:
        model.save_pretrained(hf_init_dir(cfg))
    params = sum(p.numel() for p in model.parameters())
    # Qwen2's recipe, as ours (megatron's default groups): no weight decay on norms and biases
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )
    # the targets ours trains on: the next token at every position, none where loss_mask is 0
    targets = [b["labels"].masked_fill(b["loss_mask"] == 0, -100) for b in batches]
    forward = model if not args.compile else torch.compile(model)
    context = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else nullcontext

    def step(i: int) -> float:
        tokens, target = batches[i % len(batches)]["tokens"], targets[i % len(batches)]
        with context():
            loss = forward(input_ids=tokens, labels=target, shift_labels=target, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    print(f"  hf: {params:,} parameters, built; training ({'eager' if not args.compile else 'torch.compile'})", flush=True)
    try:
        run = time_steps(step, args, device, "hf")
        run["params"] = params
        run["peak_memory_gib"] = peak_memory_gib()
        return run
    finally:
        del forward, model, optimizer
        torch._dynamo.reset()


def hf_init_dir(cfg: Any) -> Path:
    """Where --same-init keeps transformers' initial weights (in the benchmark's temporary directory)."""
    return Path(cfg.run.dir).parent / "hf_init"


def start_from_hf_init(cfg: Any) -> None:
    """--same-init: import transformers' initial weights with our converter; ours starts from them."""
    from qwen2_megatron.convert.convert import import_hf
    from qwen2_megatron.parallel.layout import ParallelLayout

    cfg.train.init_from = str(import_hf(hf_init_dir(cfg), Path(cfg.run.dir).parent / "init_ckpt", ParallelLayout()))


def run_side(name: str, fn: Callable[..., dict[str, Any]], *fn_args: Any, summary: Callable[[dict], dict]) -> dict[str, Any]:
    """One side, with out-of-memory (and any other failure) reported instead of raised."""
    import torch

    device = fn_args[-1]
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        run = fn(*fn_args)
        result = {**summary(run), "params": run["params"], "peak_memory_gib": run["peak_memory_gib"]}
    except torch.OutOfMemoryError as err:
        result = {"error": "out of memory", "detail": str(err).splitlines()[0][:300]}
        print(f"  {name}: out of memory: {result['detail']}", flush=True)
    except Exception as err:  # noqa: BLE001 - a benchmark reports the failure and goes on
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
        print(f"  {name} failed: {result['error']}", flush=True)
    result["wall_s"] = time.perf_counter() - start
    leftover = _free(device)
    if leftover is not None:
        result["leftover_allocated_gib"] = leftover
    return result


# ----- report ------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def print_table(record: dict[str, Any]) -> None:
    sides = [s for s in ("ours", "hf") if s in record]
    ratio = record.get("ratio", {})
    rows = [
        ("tokens/s", "tokens_per_s", ",.0f"),
        ("TFLOP/s per device", "tflops_per_device", ".1f"),
        ("MFU", "mfu", ".1%"),
        ("step time (median, s)", "step_time_s", ".4f"),
        ("peak memory (GiB)", "peak_memory_gib", ".2f"),
        ("loss first", "loss_first", ".4f"),
        ("loss last", "loss_last", ".4f"),
        ("parameters", "params", ",d"),
    ]
    width = 26
    print()
    print(f"{record['case']} | {record['device_name']} | seq {record['seq']} x micro-batch {record['micro_batch']} | "
          f"{record['flops_per_token'] / 1e9:.2f} GFLOP/token | peak {_fmt(record['peak_tflops'], '.0f')} TFLOP/s")
    header = f"{'':<{width}}" + "".join(f"{s:>20}" for s in sides) + (f"{'ours/hf':>12}" if len(sides) == 2 else "")
    print(header)
    for label, key, spec in rows:
        line = f"{label:<{width}}"
        for s in sides:
            side = record[s]
            line += f"{(side['error'][:19] if 'error' in side and key == 'tokens_per_s' else _fmt(side.get(key), spec)):>20}"
        if len(sides) == 2 and key in ratio:
            line += f"{_fmt(ratio[key], '.3f'):>12}"
        print(line)
    for side in sides:
        print(f"{side}: {record[side + '_desc']}")
        if "error" in record[side]:
            print(f"{side}: FAILED: {record[side]['error']}")


def summarize_file(path: Path) -> str:
    """A compact table of the JSON lines in `path` (bench records, and {"case", "skipped"/"timed_out_s"})."""
    records = [json.loads(raw) for raw in Path(path).read_text().splitlines() if raw.strip()]
    width = max([22, *(len(r.get("case", "?")) + 2 for r in records)])
    lines = [f"{'case':<{width}}{'card':<10}{'mbs':>4}  {'ours tok/s':>11}{'MFU':>7}{'GiB':>7}  "
             f"{'hf tok/s':>11}{'MFU':>7}{'GiB':>7}  {'ours/hf':>8}"]

    def side(result: dict | None) -> str:
        if result is None:
            return f"{'-':>11}{'':>7}{'':>7}"
        if "error" in result:
            return f"{result['error'][:25]:>25}"
        return (f"{result['tokens_per_s']:>11,.0f}{_fmt(result['mfu'], '.1%'):>7}"
                f"{result['peak_memory_gib']:>7.1f}")

    for r in records:
        if "ours" not in r and "hf" not in r:
            why = f"timed out after {r['timed_out_s']} s" if "timed_out_s" in r else r.get("skipped", "no result")
            lines.append(f"{r.get('case', '?'):<{width}}{why}")
            continue
        card = r["device_name"].replace("NVIDIA ", "")[:9]
        ratio = r.get("ratio", {}).get("tokens_per_s")
        lines.append(f"{r['case']:<{width}}{card:<10}{r['micro_batch']:>4}  {side(r.get('ours'))}  "
                     f"{side(r.get('hf'))}  {_fmt(ratio, '.3f'):>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        print(summarize_file(Path(sys.argv[2])))
        return 0
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA: our runtime then uses gloo
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    import megatron.core
    import transformers

    from qwen2_megatron.model.params import count_parameters, training_flops_per_token
    from qwen2_megatron.train.metrics import device_peak_tflops

    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        cfg = trainer_config(args, Path(tmp))
        shape = cfg.model
        flops_per_token = training_flops_per_token(shape, args.seq)
        peak = device_peak_tflops(args.peak_tflops) if device.type == "cuda" else args.peak_tflops
        counts = count_parameters(shape)
        device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        layers = shape.num_hidden_layers
        case = args.label or f"{args.preset}-{layers}L"
        print(f"{case}: {counts.total / 1e9:.3f}B parameters ({counts.active / 1e9:.3f}B active), {layers} layers, "
              f"seq {args.seq}, micro-batch {args.micro_batch}, {args.warmup} warm-up + {args.steps} measured steps, "
              f"{args.data} data, {device_name}; torch {torch.__version__}, transformers {transformers.__version__}, "
              f"megatron-core {megatron.core.__version__}", flush=True)
        batches = make_batches(args, cfg, device)
        tokens_per_step = args.micro_batch * args.seq

        def summary(run: dict) -> dict:
            return summarize(run, tokens_per_step, flops_per_token, peak)

        record: dict[str, Any] = {
            "case": case, "preset": args.preset, "layers": layers, "seq": args.seq, "micro_batch": args.micro_batch,
            "warmup": args.warmup, "steps": args.steps, "data": args.data, "dtype": args.dtype,
            "device_name": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
            "megatron_core": megatron.core.__version__, "flops_per_token": flops_per_token, "peak_tflops": peak,
            "params_total": counts.total, "params_active": counts.active,
            "overrides": list(args.override), "mcore": [f"{k}={v}" for k, v in args.mcore],
        }
        # transformers first: --same-init starts ours from its initial weights. (Our MoE model used
        # to outlive its Trainer here, 47.7 GB on an H200; Trainer.close() now frees it.)
        if args.only in (None, "hf"):
            precision = "fp32" if args.dtype == "fp32" else {"bf16": "bf16 params", "autocast": "fp32 params + bf16 autocast"}[args.hf_precision]
            record["hf_desc"] = (f"transformers {shape.architecture}, sdpa, {precision}, "
                                 f"{'eager' if not args.compile else 'torch.compile'}, {'fused ' if device.type == 'cuda' else ''}AdamW, clip 1.0"
                                 + (f", config {dict(args.hf_config)}" if args.hf_config else ""))
            record["hf"] = run_side("hf", run_hf, args, cfg, batches, device, summary=summary)
        if args.same_init and "error" not in record["hf"]:
            start_from_hf_init(cfg)
        if args.only in (None, "ours"):
            record["ours_desc"] = (f"megatron-core Trainer, train.precision={cfg.train.precision}, "
                                   f"recompute={cfg.train.recompute}, distributed optimizer="
                                   f"{cfg.optim.distributed_optimizer}"
                                   + ("; from transformers' initial weights" if args.same_init else "")
                                   + (f"; overrides {args.override}" if args.override else "")
                                   + (f"; TransformerConfig {dict(args.mcore)}" if args.mcore else ""))
            record["ours"] = run_side("ours", run_ours, args, cfg, batches, device, summary=summary)
        if "ours" in record and "hf" in record:
            ours, hf = record["ours"], record["hf"]
            record["ratio"] = {
                key: ours[key] / hf[key]
                for key in ("tokens_per_s", "tflops_per_device", "mfu", "step_time_s", "peak_memory_gib")
                if ours.get(key) and hf.get(key)
            }
    print_table(record)
    line = json.dumps(record)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json_out, "a", encoding="utf-8") as stream:
            stream.write(line + "\n")
    print(line, flush=True)
    failed = [s for s in ("ours", "hf") if s in record and "error" in record[s] and record[s]["error"] != "out of memory"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
