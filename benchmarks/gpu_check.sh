#!/usr/bin/env bash
# The checks only a CUDA machine can run, on a small synthetic dataset (a few minutes on one GPU):
# training.fit on the GPU (ResNet-50 with bf16, VGG19-BN with fp16 and its gradient scaler, a 3-fold
# cross-validation), training.evaluate of the result, the model loaded back and answering on the CPU,
# and torchrun with DistributedDataParallel. Each run's epoch lines give its speed in images a second.
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh [LOG_DIR]
#
# Each step's output goes to LOG_DIR (default: gpu-check-logs); the script stops at the first failure.
# It needs requirements.txt's training packages (pytorch-grad-cam included: the card measures Grad-CAM).
set -euo pipefail
PY=${PYTHON:-python3}
LOGS=${1:-gpu-check-logs}
WORK=$(mktemp -d)
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1

step() {  # step NAME COMMAND...: run it, keep its output, say how long it took
    local name=$1; shift
    local start=$SECONDS
    echo "== $name"
    "$@" > "$LOGS/$name.log" 2>&1 || { tail -40 "$LOGS/$name.log"; echo "FAILED: $name"; exit 1; }
    tail -4 "$LOGS/$name.log"
    echo "   ($((SECONDS - start)) s)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
"$PY" -c "import torch, torchvision; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(0))"

"$PY" - "$WORK/data" <<'EOF'
import sys
sys.path.insert(0, "tests")
from pathlib import Path
from synthetic import write_classes

root = Path(sys.argv[1])
write_classes(root / "train", ["alpha", "beta"], 96, size=160)
write_classes(root / "valid", ["alpha", "beta"], 24, seed=1, size=160, start=500)
EOF

COMMON=(--data "$WORK/data" --img-size 128 --batch-size 32 --workers 8 --device cuda)
step fit-resnet50 "$PY" -m training.fit "${COMMON[@]}" --arch resnet50 --epochs 3 --out "$WORK/r50"
grep -q "cuda" "$LOGS/fit-resnet50.log" || { echo "FAILED: the run did not say it trained on CUDA"; exit 1; }
step fit-vgg19-fp16 "$PY" -m training.fit "${COMMON[@]}" --arch vgg19_bn --epochs 2 --amp fp16 --out "$WORK/vgg"
step fit-cv3 "$PY" -m training.fit "${COMMON[@]}" --arch baseline --cv 3 --epochs 2 --out "$WORK/cv"
step evaluate "$PY" -m training.evaluate --model "$WORK/r50" --data "$WORK/data" --split valid \
    --out "$WORK/valid.json"
step load-on-cpu "$PY" -c "
from pathlib import Path
from ctapp.inference import load_model
model = load_model(Path('$WORK/r50'))
first = next(Path('$WORK/data/valid/beta').iterdir())
print('answered on the CPU:', model.predict(first).to_dict()['label'])"
step torchrun "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m training.fit "${COMMON[@]}" \
    --arch baseline --epochs 2 --out "$WORK/ddp"
echo "all GPU checks passed"
