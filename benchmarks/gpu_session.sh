#!/usr/bin/env bash
# One prepared GPU session (an H200 lent for ~15 minutes; see docs/research/GPU.md): the project's own source with
# PYTHONPATH=src on the machine's PyTorch / timm / transformers / PEFT, the backbone and data carried by
# benchmarks/gpu_carry.py (pack .gpu here first, and carry .gpu).
#
#   bash benchmarks/gpu_session.sh first   # unpack; engine smoke; speed table (eager, with peak memory); end-to-end
#                                          # images/s; then the cpu suite until the budget ends
#   bash benchmarks/gpu_session.sh more    # the suite again (resumes; finished runs are never redone); then the
#                                          # compiled speed rows if time is left
#   bash benchmarks/gpu_session.sh paper   # the paper profile (224 px, 100 epochs) of the same tasks, bf16
#   bash benchmarks/gpu_session.sh frontier  # issue 38 at its own (cpu) protocol, exact fp32: every run the committed
#                                            # benchmarks/records/frontier.json lacks (rate searches, then finals),
#                                            # into runs/gpu/frontier.json (benchmarks/frontier.py run --device cuda)
#   bash benchmarks/gpu_session.sh frontier-paper  # issue 38 at the paper's protocol: every frontier point whose
#                                            # rate the cpu protocol chose, seed 42, task by task (benchmarks/
#                                            # frontier.py paper), into runs/gpu/frontier-paper.json
#   bash benchmarks/gpu_session.sh extra   # issue 12's pruning curve (benchmarks/prune.py, one process per task) and
#                                          # issue 11's accuracy check of a 2-step scoring probe (heart-lora with
#                                          # --score-steps 2 --ne 24, every task and seed, into its own results file)
#   bash benchmarks/gpu_session.sh control # the random-ranking control: heart-lora --ne 24, then 48, ranked by the
#                                          # Taylor score and by chance (--score-mode random), every task and seed
#   bash benchmarks/gpu_session.sh round3  # the defaults sweep's round 3 (issue 16): 126 val200 runs on 3 seeds and
#                                          # its rule (benchmarks/sweep_defaults.py --round 3)
#   bash benchmarks/gpu_session.sh sweep   # the defaults sweep (val200) and its rule's choice: the first round's
#                                          # results are in docs/research/sweeps/defaults.json (not run again); the
#                                          # second
#                                          # round's tolerance rows ran on a CPU (committed too); what is left of it,
#                                          # a fixed third of the heads and the per-layer ranking, is 14 runs
#
# Everything it measures lands in $OUT (results.tgz + the logs). The sweep and the suite run the cpu profile's protocol
# in fp32 with TF32 matrix products (--precision tf32; a CPU runs exact fp32); bf16 autocast for the speed table and
# the end-to-end figures. Env: BUDGET (seconds this call may use), JOBS (runs side by side), FLAGS (the suite's
# --engine-flags JSON; default: only the precision), SMOKE=1 (a CPU dry run of this script with tiny settings).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HEARTLORA_CACHE=${HEARTLORA_CACHE:-/tmp/hlcache}
PY=${PY:-python3}
START=$(date +%s)
BUDGET=${BUDGET:-570}
JOBS=${JOBS:-14}
DEV=cuda
SMOKE=${SMOKE:-0}
left() { echo $((BUDGET - ($(date +%s) - START))); }
# a time limit for one phase: what is left less a margin, at least 1 s (timeout treats 0 as no limit)
limit() { local t=$(($(left) - $1)); [ $t -lt 1 ] && t=1; echo $t; }
log() { echo "[$(($(date +%s) - START)) s] $*" | tee -a "$OUT/session.log"; }
RUNS=${RUNS:-runs/gpu}
export RUNS
mkdir -p $RUNS
SUITE_RESULTS=$RUNS/suite-results.json
TINY=""  # SMOKE: every sweep and suite run at 28 px for one epoch
if [ "$SMOKE" = 1 ]; then DEV=cpu; TINY="--img-size 28 --epochs 1"; fi

pack_results() {
  log "packing results"
  find $RUNS -name metrics.json -o -name '*.log' -o -name 'suite-results.json' -o -name 'chosen*.json' -o -name 'round3.*' \
    -o -name 'RESULTS*.md' -o -name '*.jsonl' -o -name 'prune.md' -o -name 'prune.png' -o -name '*results.json' \
    -o -name 'frontier-paper.json' -o -name 'frontier.json' \
    -o -path '*-peft/adapter_*' \
    | tar czf "$OUT/results.tgz" -T - 2>/dev/null
  ls -la "$OUT"
}

unpack() {
  if [ -f "$HEARTLORA_CACHE/.unpacked" ]; then return; fi
  log "unpack"
  $PY benchmarks/gpu_carry.py unpack .gpu >$RUNS/unpack.log 2>&1
  local rc=$?
  cat $RUNS/unpack.log >>"$OUT/session.log"
  [ $rc = 0 ] && touch "$HEARTLORA_CACHE/.unpacked"  # a failed unpack is tried again by the next call
  $PY benchmarks/gpu_carry.py generate .gpu >$RUNS/generate.log 2>&1 &
}

engine_ok() {  # a tiny 1-bit Heart-LoRA run on this device: if the engine fails here, the sweep and suite would too
  log "engine smoke"
  local size=56 epochs=2
  [ "$SMOKE" = 1 ] && size=28 epochs=1
  timeout 120 $PY -m heartlora train --task digits --method heart-bi-lora --profile cpu --img-size $size \
    --epochs $epochs --device $DEV --out $RUNS/smoke --overwrite --quiet >$RUNS/smoke.log 2>&1
  local rc=$?
  log "engine smoke exit $rc"
  [ $rc = 0 ] || tail -n 30 $RUNS/smoke.log | tee -a "$OUT/session.log"
  return $rc
}

speed_eager() {
  log "speed table, eager"
  local extra=""
  [ "$SMOKE" = 1 ] && extra="--device cpu --tiny --rounds 1 --steps 1"
  timeout $(limit 360) $PY benchmarks/gpu_speed.py --no-compile --rounds 5 --steps 10 $extra \
    --out "$OUT/gpu_speed_eager.md" >$RUNS/speed_eager.log 2>&1
  log "speed eager exit $?"
}

end_to_end() {
  # the paper's resolution and batch (224 px, batch 64) for 10 epochs on fashion_mnist (train800 -> val200): training
  # images per second of the whole CLI run against the plain HF + PEFT loop, both bf16 autocast
  local size=224 epochs=10 bs=64 prec=bf16 peft_precs="bf16"
  [ "$SMOKE" = 1 ] && size=28 epochs=1 bs=32 prec=fp32 peft_precs=fp32
  for m in lora heart-lora; do
    log "end to end: heartlora $m"
    timeout 120 $PY -m heartlora train --task fashion_mnist --method $m --profile paper --protocol val \
      --img-size $size --epochs $epochs --batch-size $bs --precision $prec --device $DEV --seed 42 \
      --out $RUNS/e2e/heartlora-$m --overwrite --quiet >$RUNS/e2e-heartlora-$m.log 2>&1
  done
  for p in $peft_precs; do
    log "end to end: hf + peft $p"
    timeout 120 $PY benchmarks/baselines/hf_peft.py --task fashion_mnist --protocol val --img-size $size \
      --epochs $epochs --batch-size $bs --precision $p --seed 42 --device $DEV --out $RUNS/e2e/hf-peft-$p \
      >$RUNS/e2e-hf-peft-$p.log 2>&1
  done
  $PY - <<'EOF' | tee -a "$OUT/session.log"
import json, pathlib
import os
for f in sorted(pathlib.Path(os.environ["RUNS"], "e2e").glob("*/metrics.json")):
    m = json.loads(f.read_text())
    print(f"{f.parent.name}: {m.get('train_images_per_s', 0):.0f} training images/s, val200 {m['accuracy']:.3f}, "
          f"wall {m['wall_s']:.1f} s")
EOF
}

sweep() {
  # start from the committed results, so the first round's cells are not run again and the rule sees them
  mkdir -p $RUNS/sweep
  [ -f $RUNS/sweep/defaults.json ] || cp docs/research/sweeps/defaults.json $RUNS/sweep/defaults.json
  log "defaults sweep (val200), $JOBS side by side"
  local extra=()
  [ "$SMOKE" = 1 ] && extra=(--tasks digits --configs "hf-peft|scale 2|scale 4|tolerance 0.02")
  timeout -s INT $(limit 20) $PY benchmarks/sweep_defaults.py --jobs $JOBS --device $DEV --engine-flags "--precision tf32 $TINY" \
    --baseline-flags "--precision tf32 $TINY" --runs $RUNS/sweep \
    --dest $RUNS/sweep/defaults.md --deadline-s $(limit 120) "${extra[@]}" >$RUNS/sweep.log 2>&1
  local tasks=""
  [ "$SMOKE" = 1 ] && tasks="--tasks digits"
  $PY benchmarks/sweep_defaults.py --runs $RUNS/sweep --dest $RUNS/sweep/defaults.md --report --choose \
    $RUNS/chosen.json $tasks >$RUNS/sweep-report.log 2>&1
  cat $RUNS/chosen.json | tee -a "$OUT/session.log"
}

tiny_json() { [ "$SMOKE" = 1 ] && printf ', "--img-size", "28", "--epochs", "1"'; }

suite() {
  # today's defaults are the sweep's choice, so the suite passes only the precision (and SMOKE's tiny sizes)
  local flags=${FLAGS:-"{\"*\": [\"--precision\", \"tf32\"$(tiny_json)], \"baseline\": [\"--precision\", \"tf32\"$(tiny_json)]}"}
  echo "$flags" >$RUNS/suite-flags.json
  # start from the committed records, so a run finished before (on any machine) is never redone
  [ -f $SUITE_RESULTS ] || cp benchmarks/records/results.json $SUITE_RESULTS
  log "cpu suite with $flags"
  local extra=""
  [ "$SMOKE" = 1 ] && extra="--tasks digits --methods hf-peft,lora,heart-lora --seeds 42"
  # runs already going when the deadline passes may overrun it: the outer limit interrupts the suite (its children
  # stop and resume from their checkpoints next time) so that the results are still packed
  timeout -s INT $(limit 20) $PY benchmarks/suite.py run --profile cpu --jobs $JOBS --device $DEV --engine-flags "$flags" \
    --results $SUITE_RESULTS --runs $RUNS/suite --deadline-s $(limit ${1:-40}) --report-every 0 $extra \
    >>$RUNS/suite.log 2>&1
  log "suite exit $?"
  $PY benchmarks/suite.py status --profile cpu --results $SUITE_RESULTS | tee -a "$OUT/session.log"
}

prune_curve() {
  log "pruning curve (prune.py), one process per task"
  local tasks="fashion_mnist mnist digits dsprites_loc smallnorb_ele clevr_count" extra=""
  [ "$SMOKE" = 1 ] && tasks="digits" extra="--smoke"
  mkdir -p $RUNS/prune
  for t in $tasks; do
    timeout -s INT $(limit ${1:-200}) $PY benchmarks/prune.py --tasks $t --device $DEV --precision tf32 --threads 1 \
      --work $RUNS/prune --out $RUNS/prune/$t.jsonl $extra >$RUNS/prune-$t.log 2>&1 &
  done
  wait
  $PY benchmarks/prune.py --report $RUNS/prune/*.jsonl --dest $RUNS/prune/prune.md >>$RUNS/prune.log 2>&1
  log "pruning curve done"
}

round3() {
  # the defaults sweep's round 3 (issue 16): 6 rows × 7 tasks × seeds 42-44 on val200, 126 runs; its own rule
  mkdir -p $RUNS/sweep
  log "defaults sweep round 3 (val200, 3 seeds), $JOBS side by side"
  local extra=() tasks=()
  [ "$SMOKE" = 1 ] && extra=(--tasks digits --seeds 42 --configs "hf-peft|default") && tasks=(--tasks digits --seeds 42)
  timeout -s INT $(limit 20) $PY benchmarks/sweep_defaults.py --round 3 --jobs $JOBS --device $DEV \
    --engine-flags "--precision tf32 $TINY" --baseline-flags "--precision tf32 $TINY" --runs $RUNS/sweep \
    --dest $RUNS/sweep/round3.md --deadline-s $(limit ${1:-60}) "${extra[@]}" >$RUNS/round3.log 2>&1
  $PY benchmarks/sweep_defaults.py --round 3 --runs $RUNS/sweep --dest $RUNS/sweep/round3.md --report \
    --choose $RUNS/chosen3.json "${tasks[@]}" >>$RUNS/round3.log 2>&1
  tail -n 3 $RUNS/sweep/round3.md | tee -a "$OUT/session.log"
}

heart_suite() {
  # NAME JOBS MARGIN FLAGS…: the cpu profile's heart-lora runs with more flags, in their own results file (their run
  # ids equal the default heart-lora's), compared with other runs by `benchmarks/scoring.py --suite-check`
  local name=$1 jobs=$2 margin=$3 extra=""
  shift 3
  local flags="{\"*\": [\"--precision\", \"tf32\"$(printf ', "%s"' "$@")$(tiny_json)]}"
  [ "$SMOKE" = 1 ] && extra="--tasks digits --seeds 42"
  log "$name (heart-lora $*)"
  timeout -s INT $(limit 20) $PY benchmarks/suite.py run --profile cpu --jobs $jobs --device $DEV --methods heart-lora \
    --engine-flags "$flags" --results $RUNS/$name-results.json --runs $RUNS/$name --deadline-s $(limit $margin) \
    --report-every 0 $extra >>$RUNS/$name.log 2>&1
  log "$name exit $?"
}

score_check() {
  # heart-lora with a 2-step scoring probe (issue 11), a fixed --ne 24 (the default runs' median choice): --ne auto
  # is refused after a probe shorter than the warmup (METHOD.md §2)
  # start from the committed records (benchmarks/records/scoring/score2-results.json), so a run finished before is
  # never redone
  [ -f $RUNS/score2-results.json ] || cp benchmarks/records/scoring/score2-results.json $RUNS/score2-results.json
  heart_suite score2 $JOBS ${1:-60} --score-steps 2 --ne 24
}

control() {
  # what the Taylor ranking adds over chance: heart-lora at a fixed count with the full warmup's Taylor ranking
  # beside the same count drawn at random (--score-mode random), every task and seed, half the jobs each; 24 heads
  # first (the default runs' median choice), then 48 (where post-hoc pruning separates the two, docs/research/prune.md);
  # CONTROL_COUNTS overrides. Then `python benchmarks/scoring.py --suite-check runs/gpu/random24-results.json
  # --against runs/gpu/taylor24-results.json --differ-in score_mode` (and the same for 48)
  local f n pid
  for n in ${CONTROL_COUNTS:-24 48}; do
    for f in taylor$n random$n; do  # start from the committed records: a run finished before is never redone
      rec=benchmarks/records/scoring/$f-results.json
      [ -f $RUNS/$f-results.json ] || [ ! -f $rec ] || cp $rec $RUNS/
    done
    heart_suite taylor$n $((JOBS / 2)) ${1:-60} --ne $n &
    pid=$!
    heart_suite random$n $((JOBS - JOBS / 2)) ${1:-60} --ne $n --score-mode random
    wait $pid
  done
}

speed_compiled() {
  local t=$(($(left) - 25))
  if [ $t -lt 60 ]; then log "no time left for the compiled rows"; return; fi
  log "speed table, compiled (peft, heartlora, half off at batch 64), $t s"
  local extra=""
  [ "$SMOKE" = 1 ] && extra="--device cpu --tiny --rounds 1 --steps 1"
  timeout $t $PY benchmarks/gpu_speed.py --compiled-only --compiled-rows frozen,peft,heartlora,"half off" \
    --compiled-batch 64 --rounds 6 --steps 10 $extra --out "$OUT/gpu_speed_compiled.md" \
    >$RUNS/speed_compiled.log 2>&1
  log "speed compiled exit $?"
}

case "${1:-first}" in
  first)
    log "$(nvidia-smi -L 2>/dev/null | head -1)"
    $PY -c "import torch, timm, transformers, peft; print('torch', torch.__version__, 'timm', timm.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/session.log"
    unpack
    if engine_ok; then
      speed_eager
      end_to_end
      suite 40
    else
      speed_eager
    fi
    ;;
  more)
    unpack
    suite 150
    speed_compiled
    ;;
  sweep)
    unpack
    sweep
    ;;
  round3)
    unpack
    round3 60
    ;;
  control)
    unpack
    control 60
    ;;
  extra)
    unpack
    prune_curve 30 &
    prune_pid=$!
    score_check 120
    wait $prune_pid
    ;;
  paper)  # the paper profile (224 px, 100 epochs, batch 64): hf-peft, lora, heart-lora, heart-bi-lora; bf16 autocast
    unpack
    [ -f $SUITE_RESULTS ] || cp benchmarks/records/results.json $SUITE_RESULTS
    log "paper profile, $JOBS side by side"
    timeout -s INT $(limit 20) $PY benchmarks/suite.py run --profile paper --jobs $JOBS --device $DEV \
      --engine-flags '{"*": ["--precision", "bf16"], "baseline": ["--precision", "bf16"]}' \
      --results $SUITE_RESULTS --runs $RUNS/suite --deadline-s $(limit 150) --report-every 0 >>$RUNS/suite.log 2>&1
    $PY benchmarks/suite.py status --profile paper --results $SUITE_RESULTS | tee -a "$OUT/session.log"
    ;;
  frontier)  # issue 38's own protocol in fp32; records start from the committed ones (finished runs never redone)
    unpack
    FRONT=$RUNS/frontier.json
    [ -f $FRONT ] || cp benchmarks/records/frontier.json $FRONT
    log "frontier at its cpu protocol on this GPU (fp32), $JOBS side by side"
    FARGS="--device $DEV"
    [ "$SMOKE" = 1 ] && FARGS="--device cpu --max-runs 0"  # wiring only: a CPU run of the protocol takes 20 minutes
    timeout -s INT $(limit 20) $PY benchmarks/frontier.py run --jobs $JOBS --threads 1 $FARGS --records $FRONT \
      --runs $RUNS/frontier --doc $RUNS/FRONTIER.md --deadline-s $(limit 60) >>$RUNS/frontier.log 2>&1
    tail -n 3 $RUNS/frontier.log | tee -a "$OUT/session.log"
    ;;
  frontier-paper)  # issue 38 at the paper's protocol; records start from the committed ones
    unpack
    PAPER_OUT=$RUNS/frontier-paper.json
    [ -f $PAPER_OUT ] || cp benchmarks/records/frontier-paper.json $PAPER_OUT 2>/dev/null || true
    log "frontier at the paper's protocol, $JOBS side by side"
    FARGS="--device $DEV --precision bf16"
    [ "$SMOKE" = 1 ] && FARGS="--device cpu --precision fp32 --max-runs 0"  # wiring only: no run at 224 px here
    timeout -s INT $(limit 20) $PY benchmarks/frontier.py paper --jobs $JOBS --threads 1 $FARGS \
      --paper-records $PAPER_OUT --runs $RUNS/frontier --deadline-s $(limit 120) >>$RUNS/frontier.log 2>&1
    tail -n 3 $RUNS/frontier.log | tee -a "$OUT/session.log"
    ;;
  pack) ;;
esac
pack_results
log "done"
