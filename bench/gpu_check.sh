#!/usr/bin/env bash
# GPU checks: run once on a machine with CUDA (no install step: it uses the machine's python3 with torch,
# transformers, peft, typer, rich, safetensors, pyyaml, hypothesis and pytest already there).
#
#   bash bench/gpu_check.sh [RESULTS_DIR]        # default bench/results
#
# Writes RESULTS_DIR/gpu_env.json (versions, device), gpu_tests.txt (pytest summaries), gpu_curvature.json
# (bench/curvature.py exact + fisher sections on cuda), gpu_llm.json (the LLM sample pruned on cuda vs cpu) and
# gpu_training.json (--rounds on the LLM sample with every optimizer on cuda). SECTIONS=1,4 runs only those
# steps (default: all); section 1's full-suite run is skipped with SUITE=0.
# Every step runs even when an earlier one fails; the exit code is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-bench/results}
mkdir -p "$RESULTS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
failed=0
step() { echo "=== $*"; "$@" || { echo "FAILED: $*"; failed=$((failed + 1)); }; }
SECTIONS=${SECTIONS:-1,2,3,4}
in_sections() { [[ ",$SECTIONS," == *",$1,"* ]]; }

step $PY - "$RESULTS/gpu_env.json" <<'EOF'
import json, sys, importlib.metadata as md, torch
names = ["torch", "transformers", "peft", "safetensors", "typer", "rich"]
env = {n: md.version(n) for n in names}
env.update(cuda=torch.version.cuda, device=torch.cuda.get_device_name(0), capability=torch.cuda.get_device_capability(0))
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(env)
EOF

# 1. CUDA vs CPU agreement (tests/test_gpu.py), then the default suite with this machine's torch/peft/transformers.
: > "$RESULTS/gpu_tests.txt"
if in_sections 1; then
  step $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py > /tmp/gpu_tests_cuda.log 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" /tmp/gpu_tests_cuda.log | tail -12 | tee -a "$RESULTS/gpu_tests.txt"
  if [ "${SUITE:-1}" != 0 ]; then
    step $PY -m pytest -q -p no:cacheprovider --timeout=600 -o addopts="" -m "not slow" > /tmp/gpu_tests_all.log 2>&1
    grep -E "^(FAILED|ERROR)|passed|failed" /tmp/gpu_tests_all.log | tail -25 | tee -a "$RESULTS/gpu_tests.txt"
  fi
fi

# 2. Curvature on the GPU: exact H (CHUNK_GPU rows per pass) vs functional.hessian; Fisher on the GPT-2-small shape.
in_sections 2 && step $PY bench/curvature.py --device cuda --sections exact,fisher --repeats 2 --json "$RESULTS/gpu_curvature.json"

# 3. The LLM sample end to end on cuda and on cpu: same kept sets, losses and timings side by side.
if in_sections 3 && [ -d sample_checkpoints/llama/adapter ]; then
  step $PY - "$RESULTS/gpu_llm.json" <<'EOF'
import json, subprocess, sys, tempfile, time
runs = {}
with tempfile.TemporaryDirectory() as tmp:
    for method in ("sublora", "linear"):
        for device in ("cuda", "cpu"):
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "sublora_cli", "prune", "sample_checkpoints/llama/adapter", "--budget", "50%",
                 "--calib", "sample_checkpoints/llama/calib.py", "--method", method, "--device", device,
                 "--out", f"{tmp}/{method}-{device}", "--json"],
                capture_output=True, text=True)
            wall = time.perf_counter() - start
            entry = {"exit_code": proc.returncode, "wall_seconds": wall, "stderr_tail": proc.stderr[-2000:]}
            if proc.returncode == 0:
                report = json.loads(proc.stdout)
                entry.update(loss=report["loss"], metrics=report["metrics"], curvature=report["curvature"],
                             timings=report["timings"], kept=[m["kept"] for m in report["modules"]])
            runs[f"{method}/{device}"] = entry
            print(method, device, proc.returncode, f"{wall:.1f} s", entry.get("loss"))
for method in ("sublora", "linear"):
    a, b = runs[f"{method}/cuda"], runs[f"{method}/cpu"]
    if "kept" in a and "kept" in b:
        runs[f"{method}/same_kept"] = a["kept"] == b["kept"]
json.dump(runs, open(sys.argv[1], "w"), indent=2)
sys.exit(0 if all(r["exit_code"] == 0 for k, r in runs.items() if isinstance(r, dict)) else 1)
EOF
fi

# 4. Alternating training (issue 14) on the LLM sample: two rounds of each optimizer on cuda, timed, with the loss
#    after training and as written.
if in_sections 4 && [ -d sample_checkpoints/llama/adapter ]; then
  step $PY - "$RESULTS/gpu_training.json" <<'EOF'
import json, subprocess, sys, tempfile, time
runs = {}
with tempfile.TemporaryDirectory() as tmp:
    for optimizer in ("adam", "altlora", "altlora+", "lorsum", "sgd"):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "sublora_cli", "prune", "sample_checkpoints/llama/adapter", "--budget", "25%",
             "--calib", "sample_checkpoints/llama/calib.py", "--curvature", "fisher", "--device", "cuda",
             "--rounds", "2", "--train-steps", "50", "--optimizer", optimizer, "--out", f"{tmp}/{optimizer}", "--json"],
            capture_output=True, text=True)
        entry = {"exit_code": proc.returncode, "wall_seconds": time.perf_counter() - start,
                 "stderr_tail": proc.stderr[-2000:]}
        if proc.returncode == 0:
            report = json.loads(proc.stdout)
            entry.update(loss=report["loss"], metrics=report["metrics"], rounds=report["rounds"],
                         timings=report["timings"])
        runs[optimizer] = entry
        print(optimizer, proc.returncode, f"{entry['wall_seconds']:.1f} s", entry.get("loss", {}).get("after"))
json.dump(runs, open(sys.argv[1], "w"), indent=2)
sys.exit(0 if all(r["exit_code"] == 0 for r in runs.values()) else 1)
EOF
fi

echo "gpu_check: $failed step(s) failed"
exit "$failed"
