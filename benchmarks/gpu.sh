#!/usr/bin/env bash
# The GPU run, in one command, for the day a device is lent: about 8 minutes on one H100 or H200.
#
#   bash benchmarks/gpu.sh            # from the repository root, fxeq installed (pip install -e '.[test]')
#
# It runs, on cuda:0, and writes benchmarks/results/*-cuda.{json,md}:
#   1. latency parity, fp32 and bf16 autocast, CUDA events        (latency.py --devices cuda)
#   2. calibration cost on CUDA                                     (calibration_cost.py --device cuda)
#   3. torchrun --nproc_per_node=1 fxeq convert with nccl           (checks exit 0 and the report)
#   4. the training-quality harness, in a configuration of ~4 min   (train_quality.py)
# then prints one summary. Each step has its own time limit, so that one slow step cannot eat the others'.
# It never replaces the CPU tests: CI runs those, without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu.sh: no CUDA device here; nothing run" >&2; exit 2; }
out=benchmarks/results
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
declare -A status

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "gpu.sh: $name (at most ${limit}s)" >&2
  local begin=$SECONDS
  timeout "$limit" "$@" >"$work/$name.log" 2>&1
  local code=$?
  status[$name]="exit $code after $((SECONDS - begin))s"
  tail -n 3 "$work/$name.log" >&2
}

step latency 150 python3 benchmarks/latency.py --devices cuda --size 512 --batch 8 --reps 20 --warmup 3 \
  --tag cuda --out "$out"
step calibration_cost 90 python3 benchmarks/calibration_cost.py --device cuda --size 512 --batch 8 --batches 4 \
  --reps 3 --tag cuda --out "$out"

# torchrun with nccl: a random smp UPerNet, generated images, one process
python3 - "$work" <<'EOF'
import sys, torch, segmentation_models_pytorch as smp
from fxeq.cli.images import generate_images
work = sys.argv[1]
torch.manual_seed(0)
torch.save(smp.UPerNet("resnet18", encoder_weights=None, classes=3).state_dict(), f"{work}/upernet.pt")
generate_images(f"{work}/images", 16, size=256)
EOF
step torchrun_nccl 90 torchrun --standalone --nproc_per_node=1 -m fxeq convert "$work/upernet.pt" \
  --model segmentation_models_pytorch:UPerNet \
  --model-kwargs '{"encoder_name": "resnet18", "encoder_weights": null, "classes": 3}' \
  --calib "$work/images" --size 256 --device cuda -o "$work/upernet.fxeq.safetensors"
python3 - "$work" "$out" <<'EOF'
import json, sys
work, out = sys.argv[1:]
report = json.load(open(f"{work}/upernet.fxeq.safetensors.fxeq.json"))
record = {"processes": report["calibration_data"]["processes"], "device": report["calibration_data"]["device"],
          "sites": [s["name"] for s in report["sites"]], "calibration": report["calibration"],
          "versions": report["versions"]}
json.dump(record, open(f"{out}/torchrun-cuda.json", "w"), indent=2)
EOF

step train_quality 260 python3 benchmarks/train_quality.py --device cuda --archs UPerNet,PSPNet --encoders resnet18 \
  --optimizers sgd,adamw --seeds 0,1 --protocol both --iters 200 --pretrain-iters 200 --batch 8 --size 128 \
  --tag cuda --out "$out"

echo
echo "gpu.sh summary ($(python3 -c 'import torch; print(torch.cuda.get_device_name(0))'))"
for name in latency calibration_cost torchrun_nccl train_quality; do
  printf '  %-17s %s\n' "$name" "${status[$name]:-not run}"
done
echo "results: $(ls "$out"/*-cuda.* 2>/dev/null | tr '\n' ' ')"
