#!/usr/bin/env bash
# One device call of docs/gpu.md: the CUDA tests, `harness bench gpu`, then cifar10-instance's npid_cld
# on the carried CIFAR-10 JPEGs until the time is spent, resuming from its checkpoint when there is one.
#
#   scripts/gpu_runbook.sh [--seconds S] [--train-only] [--smoke]
#
# --seconds S    wall-clock budget of the whole script (default 560: a run call's 600 s limit less a margin);
#                the CUDA tests get at most 210 s and the benchmark what is left less 90 s (each is stopped
#                there; the benchmark's table keeps every finished row); training gets the rest less 30 s to
#                copy results, and is then interrupted with SIGINT: the harness finishes its step, checkpoints
#                it and stops, and the next call resumes from there
# --train-only   skip the CUDA tests and the benchmark (a second call: all the time goes to training)
# --smoke        the same steps at CPU scale (tests of the script): bench gpu --smoke on two methods,
#                the quick suite's npid_cld on digits for 2 steps, results in a temporary folder
#
# The data: data-carry/cifar10-jpeg.tar.gz (carried in) is copied once into data/, an ignored folder that is
# never carried, so the extracted tree, its decoded cache and split manifests stay on a warm machine for the
# next call (a carried folder is replaced by each call's copy). data-carry/COMMIT, when there, names the
# commit the records cite (the machine gets the files, not .git).
#
# Everything worth keeping is written flat into $OUT (the device tool returns at most 8 files of 16 MiB):
# env.txt, cuda-tests.log, bench-gpu.md, bench-gpu.log, train.log, the run's record once it is finished,
# and its checkpoint when it fits in 16 MiB (the paper-scale one, about 116 MB, stays on the machine).
set -uo pipefail

seconds=560 train_only=0 smoke=0 failed=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="${2-}"; shift $(( $# > 1 ? 2 : 1 )) ;;
    --train-only) train_only=1; shift ;;
    --smoke) smoke=1; shift ;;
    *) echo "error: unknown option $1 (valid: --seconds S, --train-only, --smoke)" >&2; exit 2 ;;
  esac
done
case "$seconds" in ''|*[!0-9]*) echo "error: --seconds takes a whole number of seconds, got '$seconds'" >&2; exit 2 ;; esac

start=$SECONDS
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
if ! git rev-parse HEAD >/dev/null 2>&1 && [ -f data-carry/COMMIT ]; then
  export SSL_HARNESS_COMMIT="$(tr -d '[:space:]' < data-carry/COMMIT)"
fi

if [ "$smoke" = 1 ]; then
  bench_args=(--smoke --methods simclr,npid_cld)
  results="$(mktemp -d)/results"
  suite=quick
  run_args=(run quick --methods npid_cld --seeds 0 --budget steps=2 --results-dir "$results")
else
  bench_args=()
  results=results
  suite=cifar10-instance
  # without --quiet: a progress line a minute (step, epoch, loss, images/s) and one at the interrupt
  run_args=(run cifar10-instance --methods npid_cld --datasets cifar10-jpeg --data-dir data)
  mkdir -p data
  if [ ! -d data/cifar10-jpeg ] && [ ! -f data/cifar10-jpeg.tar.gz ]; then
    # through a temporary name: a copy cut short must not pass for the archive in later calls
    cp data-carry/cifar10-jpeg.tar.gz data/.cifar10-jpeg.tar.gz.tmp && mv data/.cifar10-jpeg.tar.gz.tmp data/cifar10-jpeg.tar.gz \
      || { echo "error: cannot copy data-carry/cifar10-jpeg.tar.gz into data/ (docs/gpu.md)" >&2; exit 2; }
  fi
fi

{
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  "$python" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo "${SSL_HARNESS_COMMIT:-unknown (no .git, no data-carry/COMMIT)}")"
} > "$OUT/env.txt" 2>&1

if [ "$train_only" = 0 ]; then
  timeout -k 10 210 "$python" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tee "$OUT/cuda-tests.log"
  status=${PIPESTATUS[0]}; [ "$status" = 0 ] || failed+=("cuda tests (exit $status)")
  echo "cuda tests: exit $status after $((SECONDS - start)) s (124: stopped at 210 s)"
  cap=$((seconds - (SECONDS - start) - 90))
  timeout -k 10 "$((cap > 10 ? cap : 10))" "$python" -m harness bench gpu "${bench_args[@]}" --out "$OUT/bench-gpu.md" 2>&1 \
    | tee "$OUT/bench-gpu.log"
  status=${PIPESTATUS[0]}; [ "$status" = 0 ] || failed+=("bench gpu (exit $status)")
  echo "bench gpu: exit $status after $((SECONDS - start)) s (124: stopped; the table holds the finished rows)"
fi

left=$((seconds - (SECONDS - start) - 30))
if [ "$left" -gt 60 ]; then
  # SIGINT: the harness finishes the step, checkpoints it and exits 130 (killed 20 s later if it has not)
  timeout -k 20 --signal=INT "$left" "$python" -m harness "${run_args[@]}" 2>&1 | tee "$OUT/train.log"
  status=${PIPESTATUS[0]}; case "$status" in 0|124|130) ;; *) failed+=("training (exit $status)") ;; esac
  echo "training: exit $status after $((SECONDS - start)) s (124 or 130: stopped at the deadline)"
  find "$results/$suite" -maxdepth 1 -name '*.json' -newer "$OUT/env.txt" -exec cp {} "$OUT/" \; 2>/dev/null
  for checkpoint in "$results/$suite"/.ckpt/*.pt; do
    [ -f "$checkpoint" ] || continue
    if [ "$(stat -c %s "$checkpoint")" -le $((16 * 1024 * 1024)) ]; then
      cp "$checkpoint" "$OUT/"
    else
      echo "checkpoint $checkpoint ($(du -h "$checkpoint" | cut -f1)) is over the 16 MiB a returned file may hold: it stays on this machine for the next call while the machine is warm"
    fi
  done | tee -a "$OUT/train.log"
elif [ "$train_only" = 1 ]; then
  echo "error: --seconds $seconds leaves no time to train (at least 91 s are needed)" | tee "$OUT/train.log" >&2
  exit 2
else
  echo "no time left to train ($left s)" | tee "$OUT/train.log"
fi
echo "runbook done after $((SECONDS - start)) s; files in $OUT:"
ls -la "$OUT"
if [ ${#failed[@]} -gt 0 ]; then  # every step ran and its files are in $OUT; the exit status says what failed
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
