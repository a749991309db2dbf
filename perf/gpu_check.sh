#!/usr/bin/env bash
# The CUDA paths in one pass, with figures: LoRA (bf16) and QLoRA (NF4, paged AdamW, gradient
# checkpointing) training throughput; a QLoRA run generated from its NF4 base, merged, generated
# again; both runs evaluated (generation, ranking, NLL, shift); `rtune serve` on the GPU.
#
#   bash perf/gpu_check.sh MODEL DATA.jsonl HELDOUT.jsonl WORK_DIR [STEPS]
#
# MODEL is anything --model accepts. Prints the trained tokens/s of each run (mean of the logged
# windows after the first) and each evaluation's timings.
set -euo pipefail
model=$1 data=$2 heldout=$3 work=$4 steps=${5:-40}
mkdir -p "$work"
python3 - <<'PY'
import torch, transformers, peft, bitsandbytes
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
      f"bitsandbytes {bitsandbytes.__version__}; {torch.cuda.get_device_name()}")
PY

throughput() {
    python3 - "$1" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/log.jsonl")]
rates = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
rates = rates[1:] or rates
print(f"{sys.argv[1]}: {rows[-1]['step']} steps, {sum(rates) / len(rates):.0f} trained tokens/s "
      f"(mean of {len(rates)} logged windows, the first left out when there are more), last loss {rows[-1]['loss']:.4f}")
PY
}

for variant in lora qlora; do
    preset=paper
    [ "$variant" = qlora ] && preset=paper-qlora
    start=$SECONDS
    rtune train --model "$model" --data "$data" --method rt --config "$preset" --max-steps "$steps" \
        --log-steps 5 --save-steps 0 --out "$work/$variant" --quiet
    echo "$variant: $((SECONDS - start)) s wall, model load included"
    throughput "$work/$variant"
done

# A QLoRA run loads its base in NF4 for generation and scoring (its adapter was trained against it).
rtune generate "$work/qlora" --prompts "$heldout" --out "$work/qlora-gen.jsonl" --max-new-tokens 64
rtune merge "$work/qlora" --out "$work/qlora-merged"
rtune generate "$work/qlora-merged" --prompts "$heldout" --out "$work/merged-gen.jsonl" --max-new-tokens 64
for run in lora qlora; do
    rtune eval "$work/$run" --names "$run" --bench "$heldout" --max-new-tokens 128 --ranking-k 3 \
        --no-relevance --out "$work/eval"
done
python3 - "$work/eval" <<'PY'
import json, pathlib, sys
for summary in sorted(pathlib.Path(sys.argv[1]).glob("results/*/*/summary.json")):
    s = json.loads(summary.read_text())
    g = s["generation"]
    print(f"{summary.parent.parent.name}: generated {g['generated']} items, {g['new_tokens']} new tokens in {g['seconds']} s "
          f"({g['new_tokens'] / max(g['seconds'], 1e-9):.0f} tokens/s); timings {json.dumps(s['timings'])}")
PY

# rtune serve on the GPU: a chat request, a completion with echo + logprobs, a malformed body.
# Standard library only (perf/serve_load.py needs the openai package, which GPU images may lack).
rtune serve "$work/lora" --port 8765 --model-name lora > "$work/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
python3 - <<'PY'
import json, time, urllib.error, urllib.request

def post(path, body: bytes):
    req = urllib.request.Request(f"http://127.0.0.1:8765{path}", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())

for _ in range(180):
    try:
        urllib.request.urlopen("http://127.0.0.1:8765/health", timeout=2)
        break
    except OSError:
        time.sleep(1)
chat = {"model": "lora", "messages": [{"role": "user", "content": "Name three colours."}],
        "temperature": 0, "max_tokens": 16}
t = time.time()
status, reply = post("/v1/chat/completions", json.dumps(chat).encode())
print(f"chat -> {status} in {time.time() - t:.2f} s: usage {reply.get('usage')}, "
      f"finish {reply['choices'][0]['finish_reason']}")
status, reply = post("/v1/completions", json.dumps(
    {"model": "lora", "prompt": "The sky is", "max_tokens": 1, "echo": True, "logprobs": 1}).encode())
print(f"completion with echo -> {status}: {reply['choices'][0]['logprobs']['token_logprobs']}")
status, reply = post("/v1/chat/completions", b'{"model": ')
print(f"malformed body -> {status}: {reply['error']['message']}")
status, _ = post("/v1/chat/completions", json.dumps(chat).encode())
print(f"a request after it -> {status}")
print(urllib.request.urlopen("http://127.0.0.1:8765/stats").read().decode())
PY
