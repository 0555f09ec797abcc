#!/usr/bin/env bash
# The GPU run, in one command, for the day a device is lent: at most 8 minutes on one H100 or H200.
#
#   bash benchmarks/gpu.sh                 # from anywhere in the checkout, fxeq installed (pip install -e '.[test]')
#   bash benchmarks/gpu.sh --dry-run [OUT] # the same steps on the CPU at smoke-test sizes, into OUT (default: a
#                                          # temporary folder): checks this script without a GPU (the tests run it)
#
# On cuda:0 it runs, each step under its own time limit, and writes benchmarks/results/*-cuda.{json,md}:
#   step              limit  what
#   latency            100 s  latency.py: 4 models at 8x3x512x512, fp32 and bf16 autocast, CUDA events; fxeq
#                             captures and calibrates on the GPU (nothing runs on the CPU first)
#   calibration_cost    65 s  calibration_cost.py on CUDA: 4 models (1, 2, 1 and 4 passes), 4 batches of 8x512x512
#   torchrun_prepare    20 s  a random smp UPerNet checkpoint and 16 generated 256x256 images
#   torchrun            45 s  torchrun --standalone --nproc_per_node=1 -m fxeq convert ... --device cuda: fxeq's
#                             command line joins a process group under torchrun, nccl on CUDA; the log
#                             (NCCL_DEBUG=INFO, TORCH_CPP_LOG_LEVEL=INFO) shows whether NCCL started, and
#                             benchmarks/_gpu.py records it with the report (torchrun-cuda.json, 10 s at most)
#   train_quality      220 s  experiments/train_quality.py, sized below; --budget-s 185 starts no run after that
#   summary             15 s  benchmarks/_gpu.py summary: key figures of every file, also in gpu-cuda.md
# The limits add up to 475 s with the torchrun record; the script also never lets a step run past 455 s from
# its start (a later step gets what is left, or is skipped), `timeout -k 5` kills a step 5 s after its limit at
# the latest, and the summary gets what is left of 475 s (5 s at least), so the whole run, CUDA check included,
# stays under 480 s. Every benchmark writes its result files after each model (the training-quality experiment
# after each run), so a step stopped by its limit keeps what it measured, marked partial; the summary says
# which files are missing or partial.
#
# Sizing the first two steps (estimates too): one forward of the 4 models at 8x3x512x512 is 4.75 TFLOP
# (torch.utils.flop_counter on the meta device; deeplabv3_resnet50 2.62 of it). latency runs 13 rounds of 4
# forwards and 4 training steps (about 3 forwards each) per precision: about 2 PFLOP in all, 10 to 20 s at an
# assumed 100 to 200 TFLOP/s (TF32 and bf16 convolutions of this size); the rest is captures, calibration and
# model builds on the CPU side (about 10 s a model), about 60 s in all. calibration_cost: about 0.3 PFLOP, a
# few seconds, plus the same CPU-side work, about 40 s.
#
# Sizing the training-quality step. It has never run on a GPU, so this is an estimate, not a measurement:
#   - the work: smp UPerNet/resnet18 (default 256-channel decoder), batch 8 at 128x128: 186 GFLOP per training
#     step (forward and backward, torch.utils.flop_counter). 3 seeds x 2 protocols x 2 optimizers x 5 modes =
#     60 runs of 150 steps, plus 3 task-A pretrainings of 150 steps: 9,450 steps, 1.8 PFLOP.
#   - the CPU reference: the --quick run (PSPNet/resnet18, 2.1 GFLOP per step at batch 4, 64x64) trains 130
#     steps in about 13 s on one thread of the 2-core development machine, about 20 GFLOP/s with its overheads
#     (the committed UPerNet CPU run, 4.8 GFLOP x 4,200 steps in 1,021 s, agrees); this step would take about
#     a day there.
#   - H100: the arithmetic at an assumed 25 TFLOP/s sustained (TF32 convolutions at a small batch, a few
#     percent of peak) takes about 70 s, but a step of so small a model is more likely bound by kernel launches
#     and Python (about 400 kernels for forward, backward, optimizer and the synthetic batch): at an assumed
#     10 ms a step, about 95 s. Add 48 fxeq.transform calls (a torch.export capture on the CPU side and 4
#     calibration batches, about 1 s each: 50 s), evaluation and finalize (about 10 s), start-up and cuDNN
#     autotuning (about 15 s): about 170 s, just under 3 minutes, and at most the step's 220 s, with room for
#     the estimate to be 30% short within --budget-s and the limit. If it is further off, the runs finished by then are in the results
#     (whole seeds first: seeds are the outer loop), and the summary says how many of the 60 ran.
#
# It never replaces the CPU tests: CI runs those, without a GPU.
set -u -o pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--dry-run" ]; then
  dry=1 device=cpu tag=dry-run
  out=${2:-$(mktemp -d -t fxeq-gpu-dry-run.XXXXXX)}
else
  dry=0 device=cuda tag=cuda out=benchmarks/results
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu.sh: no CUDA device here; nothing run (bash benchmarks/gpu.sh --dry-run checks the script)" >&2
         exit 2; }
fi
mkdir -p "$out"
work=$(mktemp -d -t fxeq-gpu.XXXXXX)
trap 'rm -rf "$work"' EXIT
steps="$work/steps.txt"
: >"$steps"
budget=455  # seconds from the start that no step may run past
last_exit=-1 last_seconds=0  # of the last step, for the torchrun record

step() {  # step NAME LIMIT COMMAND...: run COMMAND under min(LIMIT, what is left), log it, record exit and time
  local name=$1 limit=$2
  shift 2
  local left=$((budget - SECONDS))
  if [ "$left" -lt 5 ]; then
    echo "$name: not run, ${SECONDS}s of the ${budget}s budget spent" >>"$steps"
    last_exit=-1 last_seconds=0
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "gpu.sh: $name (at most ${limit}s)" >&2
  local begin=$SECONDS code
  timeout -k 5 "$limit" "$@" >"$work/$name.log" 2>&1
  code=$?
  local took=$((SECONDS - begin)) said="exit $code"
  [ "$code" -eq 124 ] || [ "$code" -eq 137 ] && said="stopped at its ${limit}s limit (exit $code)"
  echo "$name: $said after ${took}s" >>"$steps"
  tail -n 3 "$work/$name.log" >&2
  last_exit=$code last_seconds=$took
  return "$code"
}

if [ "$dry" -eq 1 ]; then
  latency=(--devices cpu --threads 1 --models unet_resnet18 --modes inference --size 64 --batch 2 --reps 1
           --warmup 0)
  calibration=(--device cpu --threads 1 --models unet_resnet18 --size 64 --batch 2 --batches 2 --reps 1
               --warmup 0)
  torchrun_images=4 torchrun_size=64
  train=(--device cpu --threads 1 --archs PSPNet --optimizers sgd --modes none,init --seeds 0 --protocol both
         --iters 2 --pretrain-iters 1 --batch 2 --size 64 --eval-images 4 --calib-batches 1 --budget-s 60)
else
  latency=(--devices cuda --models deeplabv3_resnet50 upernet_convnext_tiny segformer_mit_b2 unet_resnet34
           --size 512 --batch 8 --reps 10 --warmup 3)
  calibration=(--device cuda --models deeplabv3_resnet50 upernet_convnext_tiny segformer_mit_b2 unet_resnet34
               --size 512 --batch 8 --batches 4 --reps 3 --warmup 1)
  torchrun_images=16 torchrun_size=256
  train=(--device cuda --archs UPerNet --encoders resnet18 --optimizers sgd,adamw
         --modes none,init,init_keep_norm,reparam,explicit --seeds 0,1,2 --protocol both --iters 150
         --pretrain-iters 150 --batch 8 --size 128 --eval-images 128 --calib-batches 4 --budget-s 185)
fi

step latency 100 python3 benchmarks/latency.py "${latency[@]}" --tag "$tag" --out "$out"
step calibration_cost 65 python3 benchmarks/calibration_cost.py "${calibration[@]}" --tag "$tag" --out "$out"

if step torchrun_prepare 20 python3 benchmarks/_gpu.py prepare-torchrun "$work" --images "$torchrun_images" \
     --size "$torchrun_size"; then
  step torchrun 45 env NCCL_DEBUG=INFO TORCH_CPP_LOG_LEVEL=INFO \
    torchrun --standalone --nproc_per_node=1 -m fxeq convert "$work/upernet.pt" \
    --model segmentation_models_pytorch:UPerNet \
    --model-kwargs '{"encoder_name": "resnet18", "encoder_weights": null, "classes": 3}' \
    --calib "$work/images" --size "$torchrun_size" --device "$device" -o "$work/upernet.fxeq.safetensors"
  timeout 10 python3 benchmarks/_gpu.py torchrun-record "$work" "$out" "$tag" "$last_exit" "$last_seconds" >&2
fi

step train_quality 220 python3 experiments/train_quality.py "${train[@]}" --tag "$tag" --out "$out"

echo
summary_limit=$((475 - SECONDS))
[ "$summary_limit" -gt 15 ] && summary_limit=15
[ "$summary_limit" -lt 5 ] && summary_limit=5
timeout -k 2 "$summary_limit" python3 benchmarks/_gpu.py summary "$out" "$tag" "$steps"
echo "results: $(ls "$out"/*-"$tag".* 2>/dev/null | tr '\n' ' ')"
echo "gpu.sh: ${SECONDS}s in all"
