#!/usr/bin/env bash
# kill -9 `rtune eval` in the middle of judging and re-run it: prints what was asked again.
# A local judge (SmolLM2-135M-Instruct behind `rtune serve`) judges RT vs IT on 16 AdvBench prompts.
#
#   bash scripts/judge_kill_check.sh RT_RUN IT_RUN WORK_DIR
set -uo pipefail
rt=$1 it=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
rtune serve smollm2-135m-instruct --template model --port 8766 --max-batch-size 64 > "$work/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 300); do curl -sf http://127.0.0.1:8766/health > /dev/null && break; sleep 2; done
args=("$rt" "$it" --names rt,it --bench advbench:16 --max-new-tokens 192 --no-relevance --out "$work/eval"
      --judge-url http://127.0.0.1:8766/v1 --judge-model smollm2-135m-instruct --judge refusal,pairwise
      --reference it --judge-concurrency 8 --judge-timeout 3600)
rtune eval "${args[@]}" > "$work/run1.log" 2>&1 &
pid=$!
cache=$work/eval/cache/judges/smollm2-135m-instruct.jsonl
while [ "$(cat "$cache" 2>/dev/null | wc -l)" -lt 20 ]; do
    kill -0 $pid 2>/dev/null || { echo "the eval ended before 20 judgments; see $work/run1.log"; exit 1; }
    sleep 0.5
done
kill -9 $pid; wait $pid 2>/dev/null
echo "killed with $(wc -l < "$cache") judgments cached"
sleep 30  # let the server finish the requests that were in flight (their answers are lost)
answered=$(grep -c "POST /v1/chat" "$work/serve.log")
rtune eval "${args[@]}" 2>&1 | grep "\[judge\]"
echo "server: $answered requests answered for the killed run, $(( $(grep -c "POST /v1/chat" "$work/serve.log") - answered )) for the re-run"
python3 - "$cache" <<'PY'
import json, sys
keys = [json.loads(line)["key"] for line in open(sys.argv[1])]
print(f"judgment cache: {len(keys)} lines, {len(set(keys))} distinct keys")
PY
rtune eval "${args[@]}" 2>&1 | grep "\[judge\]"
