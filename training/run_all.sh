#!/usr/bin/env bash
# Every fold and the final model of the four networks (lung and COVID; ResNet-50 and VGG19-BN) from a
# packed training set: needs this code and the pack, neither the images nor models/.
#
#   python -m training.pack --data ../shared/data/chest-ct-scan-images/Data ../shared/data/sarscov2-ctscan \
#       ../shared/data/covid-ct-ucsd ../shared/data/mosmed --out /work/runs/pack.npz
#   training/run_all.sh /work/runs/pack.npz /work/runs/all             # a GPU: minutes
#   nohup training/run_all.sh /work/runs/pack.npz /work/runs/all > /work/runs/all.log 2>&1 &   # a CPU: days
#
# Run it again to resume: finished models are kept, an interrupted one continues from its last epoch.
# Each model lands in OUT/<task>-<arch>[-byol]/ as training.fit --cv writes it (copy to models/ to ship).
#
# PRETRAIN=1: each backbone is first pretrained without labels (training.pretrain, BYOL) on every packed
# slice of all four sources, once per fold without that fold's evaluation split and once on everything
# for the final model; the fit of fold K starts from OUT/pretrain/<task>-<arch>/fold-K/backbone.pt.
# Settings (environment): PYTHON, AUGMENT (default: each recipe's own), PRETRAIN_EPOCHS (50),
# LOADER_WORKERS (processes drawing pretraining views; default: the cores), ONLY (e.g. "covid-vgg19_bn"),
# FIT_OPTIONS and PRETRAIN_OPTIONS (appended, so they win: e.g. "--batch-size 128" on a large GPU).
set -euo pipefail

PACK=${1:?usage: training/run_all.sh PACK OUT_DIR}
OUT=${2:?usage: training/run_all.sh PACK OUT_DIR}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PRETRAIN=${PRETRAIN:-0}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-50}
LOADER_WORKERS=${LOADER_WORKERS:-$(nproc)}
ONLY=${ONLY:-}
# Only names: the pack holds the slices; the sources are matched by the end of these paths.
DATA=../shared/data
LUNG_DATA=("$DATA/chest-ct-scan-images/Data")
COVID_DATA=("$DATA/sarscov2-ctscan" "$DATA/covid-ct-ucsd" "$DATA/mosmed")
ALL_DATA=("${LUNG_DATA[@]}" "${COVID_DATA[@]}")

# The shipped recipes (models/*/model_card.json), the COVID ones on three sources.
LUNG=(--cv 5 --group-pattern '^(\d+)' --split-block 0 --task "Lung cancer (4 classes)" --epochs 30
      --augment "${AUGMENT:-detail}" --crop body --intensity equalise --freeze-epochs 0)
COVID=(--cv 3 --split-block 40 --task "COVID-19 vs non-COVID" --epochs 20 --augment "${AUGMENT:-medium}"
       --crop body --target-accuracy 0.9 --freeze-epochs 0)

pretrain() {  # task arch folds fold-data options...
  local task=$1 arch=$2 folds=$3; shift 3
  local fold_data=() fold_options=()
  while [[ $1 != -- ]]; do fold_data+=("$1"); shift; done; shift
  fold_options=("$@")
  local where="$OUT/pretrain/$task-$arch"
  for run in $(seq 0 $((folds - 1))) full; do
    local dir="$where/fold-$run" exclude=(--exclude-fold "$run" --cv "$folds" --fold-data "${fold_data[@]}")
    if [[ $run == full ]]; then dir="$where/full"; exclude=(); fi
    [[ -f $dir/backbone.pt ]] && continue
    echo "== pretrain $task-$arch $run ($(date -u +%T))"
    "$PYTHON" -m training.pretrain --pack "$PACK" --data "${ALL_DATA[@]}" --arch "$arch" --img-size 128 \
      --epochs "$PRETRAIN_EPOCHS" --loader-workers "$LOADER_WORKERS" --out "$dir" --resume --quiet \
      "${exclude[@]}" "${fold_options[@]}" ${PRETRAIN_OPTIONS:-}
  done
}

fit() {  # task arch recipe-name options...
  local task=$1 arch=$2; shift 2
  local name="$task-$arch" weights=(--weights none)
  [[ -n $ONLY && $ONLY != "$name" ]] && return 0
  if [[ $PRETRAIN == 1 ]]; then
    name="$name-byol"
    weights=(--weights "$OUT/pretrain/$task-$arch/{fold}/backbone.pt")
  fi
  [[ -f $OUT/$name/model_card.json ]] && { echo "== $name: done"; return 0; }
  echo "== fit $name ($(date -u +%T))"
  "$PYTHON" -m training.fit --pack "$PACK" --arch "$arch" "${weights[@]}" --out "$OUT/$name" --resume --quiet "$@" \
    ${FIT_OPTIONS:-}
}

mkdir -p "$OUT"
for arch in resnet50 vgg19_bn; do
  size=128; [[ $arch == resnet50 ]] && size=192
  intensity=equalise; [[ $arch == resnet50 ]] && intensity=percentile
  if [[ $PRETRAIN == 1 && ( -z $ONLY || $ONLY == "lung-$arch" ) ]]; then
    pretrain lung "$arch" 5 "${LUNG_DATA[@]}" -- --group-pattern '^(\d+)' --split-block 0
  fi
  fit lung "$arch" --data "${LUNG_DATA[@]}" "${LUNG[@]}" --img-size "$size"
  if [[ $PRETRAIN == 1 && ( -z $ONLY || $ONLY == "covid-$arch" ) ]]; then
    pretrain covid "$arch" 3 "${COVID_DATA[@]}" -- --split-block 40
  fi
  fit covid "$arch" --data "${COVID_DATA[@]}" "${COVID[@]}" --img-size 128 --intensity "$intensity"
done
echo "== all done ($(date -u +%T)): $OUT"
