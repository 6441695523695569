#!/usr/bin/env bash
# The CUDA path in one command: bash bench/gpu.sh   (about 5-8 minutes on one GPU)
#
# Runs a reduced `python -m bench.batching_bench --device cuda --dtype bfloat16`: the engine's
# decode throughput against plain transformers at B = 1/16/64/128, the step token budget sweep
# (512/2048/4096) and N = 1/12/48 users over HTTP against `kvproxy serve --device cuda --dtype
# bfloat16` (batched and --max-batch 1) and `transformers serve --continuous-batching`.
# Results: bench/results/gpu/batching.{json,md,png} (docs/ are left alone).
#
# Assumptions about the machine (nothing is installed, nothing is downloaded):
#   - an NVIDIA GPU that torch sees (torch.cuda.is_available()); no network at all;
#   - Python 3.12 (or $PYTHON) with torch 2.11 (a CUDA build) and transformers 5.17 already
#     installed, plus kvproxy's runtime dependencies (tokenizers, safetensors, numpy, xxhash,
#     redis, and for the HTTP section fastapi, uvicorn, httpx, pydantic, pydantic-settings,
#     prometheus-client, platformdirs, rich). They are checked first and named if missing; with
#     only the HTTP ones missing, the in-process sections still run;
#   - kvproxy is NOT pip-installed: the bench and the servers it starts run from this checkout
#     (`python -m ...` from the repo root), so no `pip install -e .` (which would need build
#     backends from the network) is needed;
#   - the `transformers serve` arm needs fastapi, uvicorn and openai in the same Python: it is
#     skipped, with a message, when they are missing (the bench says so in its report);
#   - matplotlib is optional (no plot without it).
# Environment: PYTHON (default python3), GPU_BENCH_TIMEOUT_S (default 720: a hard stop; the
# partial results are still written to bench/results/gpu/batching.partial.json).
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LIMIT="${GPU_BENCH_TIMEOUT_S:-720}"
OUT=bench/results/gpu
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_UPDATE_CHECK=1 TOKENIZERS_PARALLELISM=false

"$PY" - <<'EOF'
import sys
import torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
if not torch.cuda.is_available():
    sys.exit("gpu.sh: torch sees no CUDA device; this script is for a GPU machine")
print("gpu:", torch.cuda.get_device_name(0))
EOF

missing() {  # the modules of "$@" that do not import
    "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}

core=$(missing tokenizers safetensors numpy xxhash redis)
if [ -n "$core" ]; then
    echo "gpu.sh: missing Python modules, needed by every section: $core (nothing is installed here)" >&2
    exit 1
fi
sections="decode budgets users"
http=$(missing fastapi uvicorn httpx pydantic pydantic_settings prometheus_client platformdirs rich)
if [ -n "$http" ]; then
    echo "gpu.sh: no HTTP section (missing: $http); running the in-process sections only" >&2
    sections="decode budgets"
fi

# A 20-second smoke test of the CUDA serving path first: one bf16 engine request, so that a
# broken CUDA path fails here with its own error rather than inside the bench.
"$PY" - <<'EOF'
import tempfile, time
from pathlib import Path
from bench.batching_model import build_qwen_model
from model_runner.engine import Engine
from model_runner.loading import load_model
from model_runner.records import GenerationRequest
from model_runner.sampling import SamplingParams
with tempfile.TemporaryDirectory() as tmp:
    loaded = load_model(str(build_qwen_model(Path(tmp) / "m")), "cuda", "bfloat16")
    engine = Engine(loaded, None, 64)
    start = time.perf_counter()
    events = list(engine.generate(GenerationRequest(list(range(300, 400)), SamplingParams(max_tokens=8, temperature=0.0))))
    print(f"smoke: {loaded.device} {loaded.dtype}, batched={engine.batched}, config={engine.config}, "
          f"{events[-1].usage.completion_tokens} tokens in {time.perf_counter() - start:.2f}s")
    engine.close()
EOF

# shellcheck disable=SC2086 # $sections is a list of words
timeout --signal=INT "$LIMIT" "$PY" -m bench.batching_bench --device cuda --dtype bfloat16 --threads 0 \
    --sections $sections --peer-python "$(command -v "$PY")" --out "$OUT"
echo "gpu.sh: results in $OUT/batching.md"
