#!/bin/bash
# A batch manifest on a Slurm cluster: one array task per shard, one GPU per task.
#
#   bash examples/slurm-array.sh        # in the folder that holds jobs.yaml, on a login node
#
# Run with bash, this script submits three steps: a warm-up job that downloads the model into
# the shared Hugging Face cache, this script again as the job array (after the warm-up), and a
# merge (after every task, successful or not). Each array task finds its shard in
# SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (any contiguous array, e.g. 0-15 or 1-16;
# throttling with %N is fine), runs only those jobs, and writes results/out-K-of-16.jsonl. A
# task that is requeued or rerun keeps its finished lines and runs the rest (--resume).
# `mmllm merge` then writes results.jsonl in manifest order and exits 1 listing any job that
# no shard finished. To run some tasks again, give the count so that each task id is taken as
# the shard index (MMLLM_SHARDS=16 sbatch --array=3,7 examples/slurm-array.sh), then merge
# again.
#
#SBATCH --job-name=mmllm-batch
#SBATCH --array=0-15
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%A_%a.log

set -euo pipefail

MODEL=${MODEL:-llava}                               # the model the manifest names
export HF_HOME=${HF_HOME:-/shared/huggingface}      # on a file system every node mounts

if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    mkdir -p logs results
    # One job with a 1x1 PNG fetches every file the model needs (weights, tokenizer,
    # processor), exactly as mmllm resolves them. Gated models also need HF_TOKEN.
    pixel='data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC'
    warm=$(sbatch --parsable --job-name=mmllm-warmup --gres=gpu:1 --time=2:00:00 \
        --output=logs/%x-%j.log \
        --wrap "mmllm image --model $MODEL --device cuda --max-tokens 1 '$pixel' hi >/dev/null")
    array=$(sbatch --parsable --dependency=afterok:"$warm" "$0")
    sbatch --job-name=mmllm-merge --dependency=afterany:"$array" --output=logs/%x-%j.log \
        --wrap "mmllm merge results/out-*.jsonl --manifest jobs.yaml -o results.jsonl"
    echo "submitted: warm-up $warm, array $array, then the merge"
    exit 0
fi

# An array task: the model is in the shared cache, so never touch the network.
export HF_HUB_OFFLINE=1
exec mmllm batch jobs.yaml --device cuda -o 'results/out-{shard}.jsonl' --resume
