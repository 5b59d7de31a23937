#!/bin/bash
# The several-GPU run of docs/benchmarks.md on a 2-GPU machine (one call, ~8 min):
#   bash bench/multi_gpu_x2.sh $OUT
# full-size random 2511 folder -> dataset editing on 1 and 2 GPUs -> cache -> LoRA r64 training on
# 1 GPU and 2 GPUs (DDP), the trainer's fast path (train.compile, bf16 LoRA weights).
set -o pipefail
OUTDIR=${1:?give the results folder}
source bench/gpu_setup.sh || exit 1
M=/tmp/full2511; W=/tmp/mg; J=$OUTDIR/multi_gpu.jsonl
TRAIN_SET="--set train.compile=true --set train.trainable_dtype=bf16"
{
python3 bench/multi_gpu.py save-model --preset full --out $M --jsonl $J &&
python3 bench/multi_gpu.py infer --model $M --images 8 --size 512 --steps 10 --out $W --jsonl $J --quiet &&
torchrun --nproc-per-node 2 bench/multi_gpu.py infer --model $M --images 8 --size 512 --steps 10 --out $W --jsonl $J \
    --cache-out /tmp/mgcache --cache-records 8 --quiet
python3 bench/multi_gpu.py summary $J
if grep -q '"kind": "cache"' $J; then
  python3 bench/multi_gpu.py train-config --model $M --cache /tmp/mgcache --out $W/train.yaml --steps 10 $TRAIN_SET
  python3 -m editkit train $W/train.yaml output_dir=$W/train-ws1; cp $W/train-ws1/metrics.csv $OUTDIR/train-ws1-metrics.csv
  python3 -m accelerate.commands.launch --config_file configs/accelerate/ddp.yaml --num_processes 2 \
      -m editkit train $W/train.yaml output_dir=$W/train-ws2; cp $W/train-ws2/metrics.csv $OUTDIR/train-ws2-metrics.csv
  python3 bench/multi_gpu.py summary-train $W/train-ws1 $W/train-ws2 --jsonl $J
  python3 bench/multi_gpu.py summary $J
fi
} 2>&1 | tee $OUTDIR/multi_gpu.log
