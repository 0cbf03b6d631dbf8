#!/bin/bash
# bench/results/arithmetic_rl.md from scratch: a short SFT of the demo model on the arithmetic task (partly learned, so
# that sampled answers are sometimes right and RL has something to reinforce), then GRPO, RLOO and our PPO from that
# same start with the exact-match reward, each keeping checkpoints for the learning curves; then
# bench/arithmetic_rl.py measures them all on the same 1,000 held-out questions. Needs runs/demo (`make demo`).
# About 30 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
TINY_HF=${TINY_HF:-.venv/bin/tiny-hf}
OUT=${OUT:-runs/arith}
TASK=${TASK:-arithmetic}
SFT_STEPS=${SFT_STEPS:-SFT_STEPS_TBD}
RL_STEPS=${RL_STEPS:-RL_STEPS_TBD}

$TINY_HF sft --model runs/demo --data $TASK --max-steps $SFT_STEPS --eval-examples 300 --samples 0 \
    --max-new-tokens 12 --disable-tqdm true --out $OUT/sft
for algo in grpo rloo; do
    $TINY_HF grpo --algo $algo --model $OUT/sft --data $TASK --rewards exact_match --max-steps $RL_STEPS \
        --learning-rate 1e-4 --per-device-train-batch-size 64 --num-generations 8 --max-completion-length 12 \
        --eval-examples 100 --save-strategy steps --save-steps $((RL_STEPS / 4)) --disable-tqdm true --out $OUT/$algo
done
$TINY_HF ppo --model $OUT/sft --task $TASK --reward-fn exact_match --max-steps $RL_STEPS --batch-size 64 \
    --max-new-tokens 12 --save-every $((RL_STEPS / 4)) --keep-last 4 --no-progress --out $OUT/ppo

$TINY_HF bench arithmetic-rl --sft $OUT/sft --task $TASK --run GRPO=$OUT/grpo --run RLOO=$OUT/rloo \
    --run "PPO (ours)=$OUT/ppo" --results bench/results
