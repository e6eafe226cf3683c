#!/usr/bin/env bash
# The paper's CIFAR-10 comparison in one 9-minute call on a lent GPU (issue 16):
# scripts/paper_cifar10.py trains, analyses and writes RESULTS.md within a budget.
#
# Here, before the call (../shared does not travel; /.data/ is git-ignored):
#   mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/
# The call, through the device tool: carry [".data"], timeout_s 540, command
#   bash scripts/paper_cifar10_gpu.sh [more paper_cifar10.py options, e.g. --seeds 2]
# (DEVICE=cpu with --subset/--epochs 1 tries the same steps on a CPU machine.)
# Back here: RESULTS.md and its figures come back as they are (links relative to $OUT);
# for the repository, regenerate them from the runs (metrics, configs, plan, analysis):
#   mkdir -p .data/paper && tar -xzf FILES_AT/runs.tar.gz -C .data/paper
#   python scripts/paper_report.py .data/paper --report RESULTS.md --figures docs/figures \
#       --commit "$(git rev-parse --short HEAD)"     # the copy sent has no git metadata
#
# Stages and their limits (the sum is 540 s):
#   env       20 s   GPU, driver, versions, date -> $OUT/env.txt (a few s: importing torch)
#   paper    490 s   paper_cifar10.py --budget 470: it plans, cuts seeds and stops runs itself
#                    to end within 470 s; the limit only backs that up -> $OUT/paper.log
#   report    15 s   only if paper did not write RESULTS.md: the report of what finished
#   pack      15 s   $OUT/runs.tar.gz: every run folder without checkpoints
# Needs python3 with torch (CUDA), triton, matplotlib, pillow, scikit-learn, tqdm; nothing
# is built (without the compiled extension the fused runs use the triton backend).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/.gpu-out}"
DATA="${HIRES_CIFAR10_TAR:-$PWD/.data/cifar10-jpeg.tar.gz}"
BUDGET="${BUDGET:-470}"
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HIRES_CACHE="${HIRES_CACHE:-/tmp/hires-cache}"
mkdir -p "$OUT"
work=$(mktemp -d /tmp/paper-cifar10.XXXXXX)   # fresh and empty: the script refuses used folders

{ timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  timeout 15 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u; git log -1 --format='commit %h %s' 2>/dev/null; } >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

set -o pipefail
timeout -k 5 $((BUDGET + 20)) "$PY" scripts/paper_cifar10.py --data "$DATA" --out "$work" \
  --report "$OUT/RESULTS.md" --budget "$BUDGET" --device "$DEVICE" "$@" 2>&1 | tee "$OUT/paper.log"
echo "== paper: rc=$? at ${SECONDS} s"
if [ ! -f "$OUT/RESULTS.md" ] && [ -f "$work/plan.json" ]; then
  timeout -k 3 15 "$PY" scripts/paper_report.py "$work" --report "$OUT/RESULTS.md" 2>&1 | tail -n 20
fi
timeout 15 tar -czf "$OUT/runs.tar.gz" --exclude='*.pt' --exclude='*.tmp*' -C "$work" .
echo "== packed at ${SECONDS} s:"; ls -la "$OUT"
