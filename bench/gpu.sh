#!/usr/bin/env bash
# bench/gpu.sh: what ds-mlm does on one GPU, through the real launcher on the bundled sample corpus.
#
#   bash bench/gpu.sh           one GPU: roberta-base at seq 128 and 512, bf16 (fp16 where the GPU has no bf16),
#                               ZeRO-1/2/3, --torch_compile off and on; per configuration tokens/s, samples/s, TFLOP/s,
#                               MFU, peak GPU memory, data-wait share, step time and wall time (read from each run's
#                               train_log.jsonl); then an exact-resume check, an export that loads, and torch's fused
#                               AdamW against DeepSpeed's FusedAdam (start-up and step time). Planned for < 8 minutes.
#   bash bench/gpu.sh --smoke   the same code paths on CPU with roberta-tiny (CI runs it: tests/integration/test_gpu_smoke.py)
#
# Every run uses the optimizer proposed as the CUDA default: "torch_adam": true, "fused": true (torch.optim.AdamW
# with its fused kernel, nothing to JIT-build). Knobs (environment): GPU_BENCH_DIR (work directory, default a new
# one under $TMPDIR or /tmp; kept), GPU_BENCH_SEQS ("128 512"), GPU_BENCH_STAGES ("1 2 3"), GPU_BENCH_COMPILE
# ("off on"), GPU_BENCH_STEPS (30), GPU_BENCH_TOKENS (tokens per micro-batch, 8192), GPU_BENCH_PEAK_TFLOPS (default:
# ds-mlm's table), GPU_BENCH_CHECKS=0 (the table only), GPU_BENCH_FUSEDADAM_RESUME=1 (also check FusedAdam's
# resume), PYTHON (default .venv/bin/python).
# Exit status: 0 when every run finished and every check held; 1 otherwise, naming each failure; 2 on bad usage.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
run_mlm=$root/ds_mlm/run_mlm.py

die() {
  echo "gpu.sh: error: $*" >&2
  exit 2
}

smoke=0
case "${1:-}" in
  --smoke) smoke=1 ;;
  "") ;;
  -h | --help) sed -n '2,/^set -euo/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
  *) die "unknown argument $1: use --smoke, or nothing" ;;
esac
[ -x "$python" ] || die "$python not found: run scripts/bootstrap.sh first (or set PYTHON)"

if [ "$smoke" = 1 ]; then  # CPU, roberta-tiny: every code path below, in a fraction of the time
  export DS_ACCELERATOR=cpu
  architecture=roberta-tiny vocab=2000 seqs=${GPU_BENCH_SEQS:-64} steps=${GPU_BENCH_STEPS:-6} tokens=512
  combos=("2:off")  # stage:compile: one pass of the loop, its run reused by the checks below (compile on CPU:
                     # tests/integration/test_throughput.py; GPU_BENCH_STAGES / GPU_BENCH_COMPILE widen it)
  peak=${GPU_BENCH_PEAK_TFLOPS:-0.5}  # CPU: mfu is logged only against a given peak; this one exercises the column
  fused_adam=${GPU_SMOKE_FUSEDADAM:-0}  # DeepSpeed's FusedAdam JIT-builds for ~50 s on CPU: off in the smoke
else
  "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
    || die "no CUDA GPU visible to $python: run on a GPU machine, or use --smoke on CPU"
  architecture=roberta-base vocab=32000 seqs=${GPU_BENCH_SEQS:-"128 512"} steps=${GPU_BENCH_STEPS:-30}
  tokens=${GPU_BENCH_TOKENS:-8192}
  combos=()
  peak=${GPU_BENCH_PEAK_TFLOPS:-}
  fused_adam=1
fi
if [ "${#combos[@]}" = 0 ] || [ -n "${GPU_BENCH_STAGES:-}${GPU_BENCH_COMPILE:-}" ]; then
  combos=()
  for stage in ${GPU_BENCH_STAGES:-1 2 3}; do
    for c in ${GPU_BENCH_COMPILE:-off on}; do combos+=("$stage:$c"); done
  done
fi
log_every=$((steps / 3))  # three logging windows: the first holds start-up and compilation, the last two are timed
[ "$log_every" -ge 1 ] || die "GPU_BENCH_STEPS=$steps: use at least 3"
work=${GPU_BENCH_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/ds-mlm-gpu-bench.XXXXXX")}
rm -rf "$work/runs"  # a rerun in the same GPU_BENCH_DIR measures afresh (the tokenizer and token stores are kept)
mkdir -p "$work/runs"
failures=()
started_all=$(date +%s)

free_port() { "$python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

# -- set-up: versions, a tokenizer, the token stores, the ds_configs ----------------------------------------------------

"$python" - "$smoke" <<'PY'
import os, platform, sys
import deepspeed, torch, transformers
device = torch.cuda.get_device_name(0) if sys.argv[1] == "0" else f"CPU ({platform.processor() or platform.machine()})"
print(f"gpu.sh{' --smoke' if sys.argv[1] == '1' else ''}: {device}; torch {torch.__version__}, deepspeed "
      f"{deepspeed.__version__}, transformers {transformers.__version__}; load average "
      f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
PY
if [ ! -f "$work/tokenizer/tokenizer_config.json" ]; then
  "$python" -m ds_mlm.train_tokenizer --type bpe --input_dir "$root/data/sample/train" --vocab_size "$vocab" \
    --min_frequency 2 --output_dir "$work/tokenizer" >"$work/tokenizer.log" 2>&1 \
    || { tail -n 20 "$work/tokenizer.log" >&2; die "training the tokenizer failed (log: $work/tokenizer.log)"; }
fi
if [ "$smoke" = 1 ]; then precision=bf16; else
  precision=$("$python" -c "import torch; print('bf16' if torch.cuda.is_bf16_supported() else 'fp16')")
fi
echo "$architecture, --$precision, a byte-level BPE of $("$python" -c "import sys; from transformers import \
AutoTokenizer; print(len(AutoTokenizer.from_pretrained(sys.argv[1])))" "$work/tokenizer") ids (asked: $vocab) on \
data/sample/train, $tokens tokens per micro-batch, $steps steps logged every $((steps / 3)); work directory $work"

"$python" - "$root/ds_configs" "$work/configs" <<'PY'
# The shipped ZeRO configs with the optimizer proposed for CUDA (torch's fused AdamW), and FusedAdam for comparison.
import json, os, sys
src, dst = sys.argv[1:]
os.makedirs(dst, exist_ok=True)
for stage in (1, 2, 3):
    config = json.load(open(os.path.join(src, f"zero{stage}.json")))
    for name, params in ((f"zero{stage}", {"torch_adam": True, "fused": True}),
                         (f"zero{stage}_fusedadam", {"torch_adam": False})):
        config["optimizer"]["params"].update(params)
        json.dump(config, open(os.path.join(dst, f"{name}.json"), "w"), indent=2)
PY

micro_for() { echo $(($1 >= tokens ? 1 : tokens / $1)); }  # micro-batch of a sequence length: `tokens` per batch
common=(--tokenizer_name_or_path "$work/tokenizer" --train_dir "$root/data/sample/train"
  --datasets_cache_dir "$work/cache" --architecture "$architecture" --max_steps "$steps"
  --logging_steps "$log_every" --save_steps 1000000 --learning_rate 1e-4
  --lr_scheduler_type constant_with_warmup --warmup_steps 2 "--$precision")  # a constant rate: resumable to any length
[ -z "$peak" ] || common+=(--peak_tflops "$peak")
for seq in $seqs; do  # built once, without the launcher, so no timed run pays for it
  "$python" -m ds_mlm.run_mlm "${common[@]}" --max_seq_length "$seq" --output_dir "$work/runs/build-$seq" \
    --build_dataset_only >"$work/runs/build-$seq.log" 2>&1 \
    || { tail -n 20 "$work/runs/build-$seq.log" >&2; die "building the seq-$seq token store failed"; }
done

# -- one configuration: a launch, then its row ---------------------------------------------------------------------------

printf '\n%-26s %-5s %10s %9s %8s %6s %8s %9s %8s %7s\n' configuration prec tokens/s samples/s TFLOP/s MFU \
  "peak GiB" "data wait" "step ms" "wall s"
declare -A walls=()  # output dir -> wall nanoseconds of its last launch
row() {  # name, output dir: the means of the timed windows (after the first) of train_log.jsonl
  "$python" - "$1" "$2" "${walls[$2]:-0}" <<'PY'
import json, sys
name, out, wall = sys.argv[1], sys.argv[2], int(sys.argv[3]) / 1e9
records = [r for r in map(json.loads, open(f"{out}/train_log.jsonl")) if "loss" in r]
timed = records[1:] or records  # the first window holds start-up and compilation
mean = lambda key: sum(r[key] for r in timed) / len(timed) if all(key in r for r in timed) else None
config = json.load(open(f"{out}/ds_config.json"))
prec = "fp16" if config["fp16"]["enabled"] else "bf16" if config["bf16"]["enabled"] else "fp32"
step_ms = 1000 * config["train_batch_size"] / mean("samples_per_s")
peak = max((r["peak_memory_gib"] for r in timed if "peak_memory_gib" in r), default=None)
fmt = lambda v, f: "-" if v is None else format(v, f)
print(f"{name:26s} {prec:5s} {mean('tokens_per_s'):10,.0f} {mean('samples_per_s'):9,.1f} {mean('tflops'):8.3g} "
      f"{fmt(mean('mfu'), '6.1%')} {fmt(peak, '8.2f')} {mean('data_wait'):9.2%} {step_ms:8.1f} {wall:7.1f}")
PY
}

launch() {  # output dir, extra run_mlm flags...: one run through the deepspeed launcher, logged to DIR.log
  local out=$1 began status=0
  shift
  began=$(date +%s%N)
  "$python" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$(free_port)" "$run_mlm" "${common[@]}" \
    --output_dir "$out" "$@" >>"$out.log" 2>&1 || status=$?
  walls[$out]=$(($(date +%s%N) - began))
  return "$status"
}

failed() {  # name, output dir: show the end of its log, count it
  echo "gpu.sh: $1 failed; the end of $2.log:" >&2
  tail -n 25 "$2.log" >&2
  failures+=("$1 (log: $2.log)")
}

run() {  # name, output dir, extra run_mlm flags...: launch, print its row; a failure is shown and counted
  local name=$1 out=$2
  shift 2
  if launch "$out" "$@"; then
    row "$name" "$out" || failures+=("$name (no record: $out.log)")
  else
    failed "$name" "$out"
  fi
}

for seq in $seqs; do
  micro=$(micro_for "$seq")
  for combo in "${combos[@]}"; do
    stage=${combo%%:*} compile=${combo#*:}
    flags=(--max_seq_length "$seq" --per_device_train_batch_size "$micro" --deepspeed_config "$work/configs/zero$stage.json")
    [ "$compile" = off ] || flags+=(--torch_compile)
    run "seq $seq ZeRO-$stage compile $compile" "$work/runs/s$seq-z$stage-$compile" "${flags[@]}"
  done
done

# -- exact resume, export, optimizers: on the first sequence length, ZeRO-2 (the default config), no compile -----------

finish() {
  echo
  echo "gpu.sh: $(($(date +%s) - started_all)) s in all; runs, logs and the export in $work"
  if [ "${#failures[@]}" -gt 0 ]; then
    printf 'gpu.sh: FAILED: %s\n' "${failures[@]}" >&2
    exit 1
  fi
  echo "gpu.sh: every configuration ran and every check held"
  exit 0
}
[ "${GPU_BENCH_CHECKS:-1}" = 1 ] || finish

seq=${seqs%% *}
micro=$(micro_for "$seq")
base=(--max_seq_length "$seq" --per_device_train_batch_size "$micro")
straight=$work/runs/s$seq-z2-off
[ -d "$straight" ] || run "seq $seq ZeRO-2 compile off" "$straight" "${base[@]}" --deepspeed_config "$work/configs/zero2.json"

resume_check() {  # name, slug, config, straight run: stop at a logging boundary, rerun to the end, compare numbers
  local name=$1 part=$work/runs/resume-$2 config=$3 reference=$4 stop=$((2 * log_every))
  # no rows for these two: a window right after a (re)start holds its warm-up, which the tables leave out
  launch "$part" "${base[@]}" --deepspeed_config "$config" --max_steps "$stop" || failed "$name: first $stop steps" "$part"
  launch "$part" "${base[@]}" --deepspeed_config "$config" || failed "$name: resumed to $steps" "$part"
  if "$python" - "$reference" "$part" "$stop" "$name" <<'PY'; then
import json, sys
timing = {"tokens_per_s", "samples_per_s", "tflops", "mfu", "data_wait", "peak_memory_gib", "time"}
def numbers(out):
    return [{k: v for k, v in r.items() if k not in timing} for r in map(json.loads, open(f"{out}/train_log.jsonl"))]
a, b = numbers(sys.argv[1]), numbers(sys.argv[2])
resumed = open(f"{sys.argv[2]}.log").read().count(f"resumed from {sys.argv[2]}/checkpoint-{sys.argv[3]}")
ok = a == b and len(a) >= 3 and resumed == 1
print(f"exact resume ({sys.argv[4]}): {'ok' if ok else 'FAILED'} ({len(b)} records, steps {[r['step'] for r in b]}, "
      f"{'resumed from checkpoint-' + sys.argv[3] if resumed else 'no resume seen'}; loss, lr, grad norm equal)")
if not ok:
    for x, y in zip(a, b):
        if x != y:
            print(f"  first difference: uninterrupted {x} vs resumed {y}")
            break
sys.exit(0 if ok else 1)
PY
    :
  else
    failures+=("$name exact resume")
  fi
}
echo
[ -f "$straight/train_log.jsonl" ] && resume_check "fused AdamW" fused "$work/configs/zero2.json" "$straight"

if "$python" -m ds_mlm.export --checkpoint "$work/runs/resume-fused/checkpoint-$steps" \
  --output_dir "$work/export" >"$work/export.log" 2>&1 && "$python" - "$work" 2>>"$work/export.log" <<'PY'; then
import sys, torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline
work = sys.argv[1]
model_dir = f"{work}/export/roberta_thai"
model, tokenizer = AutoModelForMaskedLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
rows = model.roberta.embeddings.word_embeddings.weight.shape[0]
in_run = AutoModelForMaskedLM.from_pretrained(f"{work}/runs/resume-fused/roberta_thai").state_dict()
same = all(torch.equal(v, in_run[k]) for k, v in model.state_dict().items())
guesses = pipeline("fill-mask", model=model_dir, device="cpu")("The <mask> of the school was there.")
ok = model.config.vocab_size == rows == len(tokenizer) and same and len(guesses) == 5
print(f"export: {'ok' if ok else 'FAILED'} (vocab_size {model.config.vocab_size}, {rows} rows, tokenizer "
      f"{len(tokenizer)}; {'equal to' if same else 'DIFFERENT from'} the in-run export; fill-mask top guess "
      f"{guesses[0]['token_str']!r})")
sys.exit(0 if ok else 1)
PY
  :
else
  tail -n 20 "$work/export.log" >&2
  failures+=("export")
fi

echo
echo "optimizer, seq $seq ZeRO-2 compile off (wall s: start-up, any extension build, $steps steps, save, export):"
[ -f "$straight/train_log.jsonl" ] && row "torch AdamW fused=True" "$straight"
if [ "$fused_adam" = 1 ]; then  # a fresh extension directory: a JIT build is paid as on a new machine
  export TORCH_EXTENSIONS_DIR=$work/torch_extensions
  if launch "$work/runs/fusedadam" "${base[@]}" --deepspeed_config "$work/configs/zero2_fusedadam.json"; then
    row "DeepSpeed FusedAdam" "$work/runs/fusedadam" || failures+=("FusedAdam (no record)")
    if [ "${GPU_BENCH_FUSEDADAM_RESUME:-0}" = 1 ]; then
      resume_check "FusedAdam" fusedadam "$work/configs/zero2_fusedadam.json" "$work/runs/fusedadam"
    fi
  elif grep -Eq "Unable to JIT load|CUDA_HOME|nvcc|ninja" "$work/runs/fusedadam.log"; then
    # not pre-built and not buildable here (no CUDA toolkit): a finding about FusedAdam, not a failure of ds-mlm
    echo "DeepSpeed FusedAdam         not available: not pre-built, and its JIT build failed ($(grep -Em1 \
      "Unable to JIT load|CUDA_HOME|nvcc|ninja" "$work/runs/fusedadam.log" | cut -c1-120))"
  else
    tail -n 25 "$work/runs/fusedadam.log" >&2
    failures+=("DeepSpeed FusedAdam (log: $work/runs/fusedadam.log)")
  fi
else
  echo "DeepSpeed FusedAdam         skipped in the smoke (a ~50 s JIT build on CPU; GPU_SMOKE_FUSEDADAM=1 runs it)"
fi

finish
