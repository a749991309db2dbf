#!/usr/bin/env bash
# The untrained baselines beside a response-tuned model (the paper's URIAL-R comparison): the base
# model with the tulu prompt, alone and with the rule-based adapter of Hewitt et al. 2024 (--rules),
# zero-shot, with URIAL and with URIAL-R, and the RT run, on a held-out set with reference responses
# (also a response-ranking set), judge-free metrics side by side in one report. Rows: base,
# base+rules, base+zero-shot, base+urial, base+urial-r, rt. The rules change decoding only: the
# response ranking and reference NLL of base+rules are the base's own.
#
#   bash scripts/icl_compare.sh BASE RT_RUN HELDOUT.jsonl EVAL_DIR [RANKING_K]
#   bash scripts/icl_compare.sh gemma-3-270m rtune-demo/runs/rt rtune-demo/data/train.heldout.jsonl evals/icl
set -euo pipefail
base=$1 rt=$2 heldout=$3 out=$4 k=${5:-3}
common=(--bench "$heldout" --ranking-k "$k" --max-new-tokens 192 --batch-size 24 --out "$out")
start=$SECONDS
rtune eval "$base" --names base "${common[@]}"
rtune eval "$base" --names base --rules eos,uniform,diversity --rules-show "${common[@]}"
for icl in zero-shot urial urial-r; do
    rtune eval "$base" --names base --icl "$icl" "${common[@]}"
done
rtune eval "$rt" --names rt "${common[@]}"
rtune report "$out" --out "$out/report"
echo "icl_compare: $((SECONDS - start)) s; report in $out/report/report.md"
