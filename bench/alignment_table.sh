#!/bin/bash
# bench/results/alignment.md from scratch: every alignment method trained from the same SFT start (runs/sft, with
# its reward model runs/reward), then `tiny-hf compare` measures them all on the same held-out prompts.
# About 30 minutes on 2 CPU cores. One torch thread per process: these models are so small that two threads per op
# mostly wait for each other when anything else runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
TINY_HF=${TINY_HF:-.venv/bin/tiny-hf}
OUT=${OUT:-runs/cmp}
SFT=${SFT:-runs/sft}
RM=${RM:-runs/reward}

# verifiable task: the shaped partial_credit reward (exact match alone ties ~90% of GRPO's groups)
$TINY_HF grpo --model $SFT --rewards partial_credit --max-steps 40 --learning-rate 5e-5 --eval-examples 8 \
    --out $OUT/grpo-verifiable
$TINY_HF grpo --algo rloo --model $SFT --rewards partial_credit --max-steps 40 --learning-rate 5e-5 \
    --eval-examples 8 --out $OUT/rloo-verifiable
$TINY_HF ppo --model $SFT --task verifiable --reward-fn partial_credit --max-steps 80 --lr 2e-5 \
    --save-every 20 --keep-last 4 --no-progress --out $OUT/ppo-verifiable
# docs task: DPO on the preference pairs; PPO on the reward model, with and without the KL penalty
$TINY_HF dpo --model $SFT --max-steps 150 --out $OUT/dpo
$TINY_HF ppo --model $SFT --task docs --reward-model $RM --lr 5e-5 --max-steps 60 --max-new-tokens 48 \
    --save-every 10 --keep-last 10 --no-progress --out $OUT/ppo-docs
$TINY_HF ppo --model $SFT --task docs --reward-model $RM --kl-coef 0 --lr 5e-5 --max-steps 60 \
    --max-new-tokens 48 --save-every 10 --keep-last 10 --no-progress --out $OUT/ppo-docs-kl0

$TINY_HF compare --sft $SFT --reward-model $RM \
    --policy "docs:DPO=$OUT/dpo" \
    --policy "docs:PPO (RM)=$OUT/ppo-docs" \
    --policy "docs:PPO (RM, KL coef 0)=$OUT/ppo-docs-kl0" \
    --policy "verifiable:PPO (partial credit)=$OUT/ppo-verifiable" \
    --policy "verifiable:GRPO (partial credit)=$OUT/grpo-verifiable" \
    --policy "verifiable:RLOO (partial credit)=$OUT/rloo-verifiable" \
    --trajectory "PPO, KL coef 0.05=$OUT/ppo-docs" --trajectory "PPO, KL coef 0=$OUT/ppo-docs-kl0" \
    --out runs/compare --results bench/results
