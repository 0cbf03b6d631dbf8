#!/bin/bash
# bench/results/arithmetic_rl.md from scratch: a short SFT of the demo model on the arithmetic task (partly learned:
# sampled answers are sometimes right, so RL has something to reinforce), then GRPO at two learning rates, RLOO and
# our PPO from that same start with the exact-match reward (and GRPO with the per-digit shaped reward), each keeping
# checkpoints for the learning curves; then
# bench/arithmetic_rl.py measures them all on the same 1,000 held-out questions. Needs runs/demo (`make demo`).
# About 40 minutes on 2 idle CPU cores. Override the budgets to try longer runs: SFT_STEPS=... RL_STEPS=...
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
TINY_HF=${TINY_HF:-.venv/bin/tiny-hf}
OUT=${OUT:-runs/arith}
TASK=${TASK:-arithmetic}
SFT_STEPS=${SFT_STEPS:-200}
RL_STEPS=${RL_STEPS:-100}

$TINY_HF sft --model runs/demo --data $TASK --max-steps $SFT_STEPS --eval-examples 300 --samples 0 \
    --max-new-tokens 12 --disable-tqdm true --out $OUT/sft
grpo() {  # name, learning rate, prompts x 8 answers per step, steps, reward, algorithm
    $TINY_HF grpo --algo $6 --model $OUT/sft --data $TASK --rewards $5 --learning-rate $2 \
        --per-device-train-batch-size $(($3 * 8)) --num-generations 8 --max-steps $4 --max-completion-length 12 \
        --eval-examples 300 --save-strategy steps --save-steps $(($4 / 4)) --logging-steps 5 --disable-tqdm true \
        --out $OUT/$1
}
grpo grpo-lr1e-4 1e-4 8 $((RL_STEPS * 2)) exact_match grpo
grpo grpo-lr3e-5 3e-5 32 $RL_STEPS exact_match grpo
grpo grpo-digits-lr1e-4 1e-4 32 $RL_STEPS digits grpo
grpo rloo-lr3e-5 3e-5 32 $RL_STEPS exact_match rloo
$TINY_HF ppo --model $OUT/sft --task $TASK --reward-fn exact_match --max-steps $RL_STEPS --batch-size 64 --lr 5e-5 \
    --max-new-tokens 12 --save-every $((RL_STEPS / 4)) --keep-last 4 --no-progress --out $OUT/ppo

$TINY_HF bench arithmetic-rl --sft $OUT/sft --task $TASK --run "GRPO, lr 1e-4, 8 prompts/step=$OUT/grpo-lr1e-4" \
    --run "GRPO, lr 3e-5, 32 prompts/step=$OUT/grpo-lr3e-5" \
    --run "GRPO, per-digit reward, lr 1e-4, 32 prompts/step=$OUT/grpo-digits-lr1e-4" \
    --run "RLOO, lr 3e-5, 32 prompts/step=$OUT/rloo-lr3e-5" --run "PPO (ours), lr 5e-5=$OUT/ppo" \
    --results bench/results
