#!/usr/bin/env bash
# make notebooks-robust [NB="notebooks/X.ipynb ..."]: would these notebooks pass nbval on another machine?
#
# A training run's digits depend on the order in which the CPU adds floats, so they change with the CPU
# model, the BLAS kernels and the thread count. This script plays "another machine" on this one: it copies
# the working tree to a scratch folder, executes each notebook there with two threads and different CPU
# kernels (ATen's portable kernels; MKL and oneDNN held to AVX2), then validates those outputs with nbval
# under one thread and the default kernels, exactly as `make nbval` does. A cell that fails here would fail
# elsewhere; a cell that passes can still fail on some machine if it compares many digits, so compare few.
# Run it before committing a notebook. Exit status 0 only when every notebook passes.
set -u
root=$(pwd)
[ -x "$root/.venv/bin/python" ] || { echo "no .venv: run 'make install' in the project root first"; exit 2; }
if [ $# -gt 0 ]; then notebooks=("$@"); else notebooks=(notebooks/*.ipynb notebooks/solutions/*.ipynb); fi
scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
# the tracked and untracked-but-not-ignored files, as a fresh clone plus your edits would have them
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$scratch" 2>/dev/null
export PYTHONHASHSEED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=
passed=0; total=0
for nb in "${notebooks[@]}"; do
  [ -f "$nb" ] || continue
  total=$((total + 1))
  dir=$(dirname "$nb"); name=$(basename "$nb")
  if ! (cd "$scratch/$dir" && OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 ATEN_CPU_CAPABILITY=default \
        MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 MPLBACKEND=module://matplotlib_inline.backend_inline \
        "$root/.venv/bin/jupyter" nbconvert --to notebook --execute --inplace "$name" \
        --ExecutePreprocessor.timeout=900 >"$scratch/exec.log" 2>&1); then
    echo "FAIL $nb: does not execute with two threads: $(tail -n 1 "$scratch/exec.log")"; continue
  fi
  if report=$(cd "$scratch" && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg "$root/.venv/bin/python" -m pytest \
        -q -p no:cacheprovider --nbval "$dir/$name" --sanitize-with notebooks/sanitize.cfg 2>&1); then
    passed=$((passed + 1)); echo "ok   $nb"
  else
    echo "FAIL $nb: differing cells: $(echo "$report" | grep -E '^FAILED' | sed 's/ - .*//; s/.*::Cell /cell /' | tr '\n' ' ')"
  fi
done
echo "robust: $passed/$total notebooks"
[ "$passed" -eq "$total" ]
