#!/usr/bin/env bash
# The project's GPU checks in one command, for a GPU machine held for a short time (a lent or
# rented node): set up from a wheelhouse if there is one, run the steps asked for within a time
# budget, and always pack what they made into a few files under OUTDIR, also when a step fails or
# the budget runs out (a step cut off resumes on the next call: runs keep their checkpoints).
#
#   bash tools/gpu_checks.sh OUTDIR STEP...
#   GPU_CHECKS_BUDGET_S=540 bash tools/gpu_checks.sh "$OUT" env test study
#
# Steps:
#   env        GPU, driver, torch / Triton / detectron2 versions
#   test       the fused kernel's tests and the channels_last test on the GPU, under a minute
#   bench      tools/benchmark.py, all of it (~2.5 min on an H100)      -> OUTDIR/benchmark.json
#   bench-loss tools/benchmark.py --sections loss: the loss variants only -> OUTDIR/benchmark_loss.json
#   blocks     tools/fused_block_sweep.py, fp32, fp16, bf16 (the default first) -> OUTDIR/fused_block_sweep.json
#   study      the GPU study of docs/RESULTS.md (12 runs at once), ~8 min on an H100
#                                                                       -> OUTDIR/study_gpu.tgz
#   study-lr   CE, FL* g=0.25 and g=0.5 at lr 0.005 on the same data, seeds 0 1 (6 runs at once)
#                                                                       -> OUTDIR/study_gpu_lr005.tgz
#   proxy-pretrain  the round-2 proxy's fractal-pretrained ResNet-18 (docs/RESULTS.md)
#                                                                       -> OUTDIR/pretrain.json
#   proxy-table1    RetinaNet's Table 1 on the proxy: CE at alpha .25/.5/.75, FL at gamma
#                   .5/1/2/5, seeds 0 1 2 (21 runs: 9, then 12 at once)         -> OUTDIR/proxy.tgz
#   proxy-flstar    FL* at gamma .125/.25/.5 on the proxy, seeds 0 1 2  -> OUTDIR/proxy.tgz
#   proxy80-pretrain  the COCO-imbalance proxy's backbone rebuilt: configs/proxy80_pretrain.yaml
#                   (detection on other scenes, FLSTAR_APPENDIX loss), its ResNet kept in
#                   output/proxy80_backbone; the proxy's configs use the committed
#                   weights/proxy80_trunk.pth (another machine makes another trunk: compare its AP
#                   with weights/README.md's)                    -> OUTDIR/proxy80_pretrain.tgz
#   proxy80-table1  Table 1 on configs/proxy80_flstar.yaml (the trunk runs on the GPU, no cache),
#                   each loss at its own rate (a shared rate decides the comparison: on this proxy
#                   CE's best is 0.005, FL g2's 0.02): a rate grid (0.0025-0.04) on seed 0 for CE
#                   alpha .25/.5/.75 and FL gamma .5/1/2/5 (alpha .25), 35 runs, 12 at once (a
#                   diverging rate is a result, not retried); then seeds 1-4 of each row at its
#                   best rate (tools/table1.py --sweep-args), 28 runs, 14 at once
#                   -> OUTDIR/proxy80_rates.tgz, OUTDIR/proxy80_table1.tgz, OUTDIR/proxy80_table1.md
#   proxy80-flstar  FL* gamma .125/.25/.5 at alpha .25 and .75 (the issue: .25 and FL*'s own
#                   best) on the same rate grid, seed 0 (30 runs, 15 at once): its own best rates,
#                   before its seeds                         -> OUTDIR/proxy80_flstar_rates.tgz
#   proxy80-ablation  what moves the FL-vs-CE gap between the round-2 proxy and the round-3 one
#                   (tools/ablation.py): CE alpha .75 and FL g2 alpha .25 on the round-2 proxy, then
#                   + 80 classes, + no clipping, + the round-3 trunk (configs/proxy80_ablation/),
#                   the rate grid on seed 0 (40 runs of 600 iterations, 10 at once), then seeds 1-2
#                   at each one's rate (16 at once); the last step is proxy80-table1's runs. Makes
#                   the round-2 CE-trained trunk first (~1 min); the round-3 one is committed
#                   -> OUTDIR/proxy80_ablation.tgz, OUTDIR/proxy80_ablation.md
#   (the four in one call: a fresh machine keeps nothing from an earlier one)
# A study's .tgz holds, per run, results.json, metrics.json, config.yaml (the files docs/results/
# keeps), log.txt and the saved detections (inference/coco_instances_results.json, for the
# comparison's intervals), and the comparison of all its runs (tools/compare.py). Unpack it with
#   tar xzf study_gpu.tgz -C docs/results/
# Everything the steps print also goes to OUTDIR/gpu_checks.log.
#
# Wheelhouse: if the Python (.venv/bin/python, else python3, or $PYTHON) cannot import detectron2,
# fvcore and pycocotools and .whl/ exists (tools/offline_wheels.sh), .whl/ is installed into
# /tmp/site first, with no index.
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS="env test bench bench-loss blocks study study-lr proxy-pretrain proxy-table1 proxy-flstar proxy80-pretrain proxy80-table1 proxy80-flstar proxy80-ablation"
OUTDIR=${1:?usage: bash tools/gpu_checks.sh OUTDIR STEP... (steps: $STEPS)}
shift
[ $# -gt 0 ] || { echo "gpu_checks.sh: name at least one step: $STEPS" >&2; exit 2; }
for step in "$@"; do
  case " $STEPS " in *" $step "*) ;;
    *) echo "gpu_checks.sh: unknown step '$step' (allowed: $STEPS)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_checks.log"
exec > >(tee -a "$LOG") 2>&1
BUDGET=${GPU_CHECKS_BUDGET_S:-540}
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

if [ -d .whl ] && ! "$PY" -c "import detectron2, fvcore, pycocotools" 2>/dev/null; then
  echo "[gpu_checks] installing the wheelhouse .whl/ into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  "$PY" -c "import zipfile, glob; [zipfile.ZipFile(w).extractall('/tmp/site') for w in glob.glob('.whl/detectron2/*.whl')]" || exit 1
  export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

STUDY_CFG=configs/study_shapes_gpu.yaml
PROXY_CFG=configs/proxy_flstar.yaml
PROXY80_CFG=configs/proxy80_flstar.yaml
# on the GPU the proxy's frozen trunk runs (the feature cache is the CPU's speed lever)
PROXY80_GPU=(MODEL.DEVICE cuda MODEL.FOCALSTAR.FEATURE_CACHE "" DATALOADER.NUM_WORKERS 2)
PROXY80_RATES=(0.0025 0.005 0.01 0.02 0.04)
# the ablation's steps, in the chain's order (tools/ablation.py); the round-3 proxy is the last
ABLATION_CFGS=(configs/proxy_shapes_flstar.yaml configs/proxy80_ablation/1_classes.yaml
  configs/proxy80_ablation/2_no_clipping.yaml configs/proxy80_ablation/3_neutral_trunk.yaml)
ABLATION_PAIR=("--loss-types CE --alphas 0.75" "--loss-types FL --param FL.gamma=2 --alphas 0.25")
pack_study() {  # folder name [run glob] -> OUTDIR/name.tgz with the kept files of each run and the comparison
  local name=$1 dir=output/$1 runs=${2:-*/}
  [ -d "$dir" ] || return 0
  # shellcheck disable=SC2086  # $runs is a glob
  "$PY" tools/compare.py "$dir"/$runs --out "$dir/compare" || echo "[gpu_checks] compare.py failed"
  (cd output && find "$name" -maxdepth 4 \( -name results.json -o -name metrics.json \
      -o -name config.yaml -o -name log.txt -o -name 'compare*' -o -name coco_instances_results.json \) -print0 |
    tar czf - --null -T -) >"$OUTDIR/$name.tgz"
  echo "[gpu_checks] packed $OUTDIR/$name.tgz ($(tar tzf "$OUTDIR/$name.tgz" | grep -c results.json) finished runs)"
}
run_step() {
  local step=$1 t
  t=$(left)
  if [ "$t" -lt 30 ]; then echo "[gpu_checks] $step: skipped, ${t} s of the budget left"; return 1; fi
  echo "[gpu_checks] $step: start, ${t} s of the budget left"
  case $step in
    env)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
      "$PY" -c "import torch, triton, detectron2, fvcore, pycocotools, d2_focalstar; print('torch', torch.__version__, '| triton', triton.__version__, '| detectron2', detectron2.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" ;;
    test)
      timeout -k 10 "$t" "$PY" -m pytest -q -p no:cacheprovider tests/test_fused.py \
        tests/test_model.py::test_channels_last_layout_gives_the_same_losses ;;
    bench)
      timeout -k 10 "$t" "$PY" tools/benchmark.py --out "$OUTDIR/benchmark.json" ;;
    bench-loss)
      timeout -k 10 "$t" "$PY" tools/benchmark.py --sections loss --out "$OUTDIR/benchmark_loss.json" ;;
    blocks)
      timeout -k 10 "$t" "$PY" tools/fused_block_sweep.py --dtypes fp32 fp16 bf16 --out "$OUTDIR/fused_block_sweep.json" ;;
    study)
      # the study of docs/RESULTS.md: 12 runs (two seeds of six settings) at once on the one GPU
      timeout -k 20 "$t" "$PY" tools/sweep.py --config-file $STUDY_CFG --jobs 12 \
        --loss-types CE FL FLSTAR FLSTAR_APPENDIX --gammas 0.125 0.25 0.5 --seeds 0 1 \
        --out output/study_gpu
      local rc=$?; pack_study study_gpu; return $rc ;;
    study-lr)
      timeout -k 20 "$t" "$PY" tools/sweep.py --config-file $STUDY_CFG --jobs 6 \
        --loss-types CE FLSTAR --gammas 0.25 0.5 --seeds 0 1 --out output/study_gpu_lr005 \
        -- SOLVER.BASE_LR 0.005
      local rc=$?; pack_study study_gpu_lr005; return $rc ;;
    proxy-pretrain)
      timeout -k 20 "$t" "$PY" tools/pretrain_backbone.py --config-file $PROXY_CFG \
        --out output/pretrain_fractal_r18 --workers 8 --device cuda
      local rc=$?; cp output/pretrain_fractal_r18/pretrain.json "$OUTDIR/" 2>/dev/null; return $rc ;;
    proxy-table1)
      timeout -k 20 "$t" "$PY" tools/sweep.py --config-file $PROXY_CFG --jobs 11 --loss-types CE \
        --alphas 0.25 0.5 0.75 --seeds 0 1 2 --out output/proxy &&
      timeout -k 20 "$(left)" "$PY" tools/sweep.py --config-file $PROXY_CFG --jobs 12 --loss-types FL \
        --param FL.gamma=0.5,1,2,5 --seeds 0 1 2 --out output/proxy
      local rc=$?; pack_study proxy; return $rc ;;
    proxy-flstar)
      timeout -k 20 "$t" "$PY" tools/sweep.py --config-file $PROXY_CFG --jobs 9 --loss-types FLSTAR \
        --seeds 0 1 2 --out output/proxy
      local rc=$?; pack_study proxy; return $rc ;;
    proxy80-pretrain)
      timeout -k 20 "$t" "$PY" train_net.py --config-file configs/proxy80_pretrain.yaml MODEL.DEVICE cuda \
        DATALOADER.NUM_WORKERS 8 &&
      "$PY" tools/pretrain_backbone.py --from-detector output/proxy80_pretrain/model_final.pth \
        --out output/proxy80_backbone
      local rc=$?
      (cd output && tar czf - proxy80_pretrain/results.json proxy80_pretrain/metrics.json \
        proxy80_pretrain/config.yaml proxy80_pretrain/log.txt 2>/dev/null) >"$OUTDIR/proxy80_pretrain.tgz"
      return $rc ;;
    proxy80-table1)
      # 1. the rate grid on seed 0 (CE at each alpha, FL at each gamma)
      timeout -k 20 "$t" "$PY" tools/sweep.py --config-file $PROXY80_CFG --jobs 12 --loss-types CE \
        --alphas 0.25 0.5 0.75 --base-lrs "${PROXY80_RATES[@]}" --seeds 0 --out output/proxy80_rates \
        -- "${PROXY80_GPU[@]}" &&
      timeout -k 20 "$(left)" "$PY" tools/sweep.py --config-file $PROXY80_CFG --jobs 12 --loss-types FL \
        --param FL.gamma=0.5,1,2,5 --alphas 0.25 --base-lrs "${PROXY80_RATES[@]}" --seeds 0 \
        --out output/proxy80_rates -- "${PROXY80_GPU[@]}" &&
      "$PY" tools/table1.py output/proxy80_rates/*/ --sweep-args >output/proxy80_rows.txt
      local rc=$?; pack_study proxy80_rates; [ $rc -eq 0 ] || return $rc
      # 2. seeds 1-4 of each row at its rate, the rows side by side (a sweep per row: its own folder)
      t=$(left)  # (timeout 0 would mean no limit)
      if [ "$t" -lt 30 ]; then echo "[gpu_checks] $step: seeds 1-4 not started, ${t} s left"; return 1; fi
      local i=0 pids=() row p
      while read -r row; do
        i=$((i + 1))
        # shellcheck disable=SC2086  # $row is the row's sweep.py arguments
        OMP_NUM_THREADS=1 timeout -k 20 "$t" "$PY" tools/sweep.py --config-file $PROXY80_CFG \
          --jobs 2 $row --seeds 1 2 3 4 --out "output/proxy80_table1/row$i" -- "${PROXY80_GPU[@]}" \
          >"output/proxy80_table1_row$i.log" 2>&1 &
        pids+=($!)
      done <output/proxy80_rows.txt
      for p in "${pids[@]}"; do wait "$p" || rc=1; done
      tail -n 3 output/proxy80_table1_row*.log
      "$PY" tools/table1.py output/proxy80_rates/*/ output/proxy80_table1/*/*/ \
        --out "$OUTDIR/proxy80_table1" || rc=1
      pack_study proxy80_table1 '*/*/'; return $rc ;;
    proxy80-flstar)
      timeout -k 20 "$t" "$PY" tools/sweep.py --config-file $PROXY80_CFG --jobs 15 --loss-types FLSTAR \
        --gammas 0.125 0.25 0.5 --alphas 0.25 0.75 --base-lrs "${PROXY80_RATES[@]}" --seeds 0 \
        --out output/proxy80_flstar_rates -- "${PROXY80_GPU[@]}"
      local rc=$?; pack_study proxy80_flstar_rates; return $rc ;;
    proxy80-ablation)
      if [ ! -f output/pretrain_shapes_r18/backbone.pth ]; then  # configs/proxy_shapes_flstar.yaml's
        timeout -k 20 "$t" "$PY" train_net.py --config-file configs/quickstart_flstar.yaml \
          MODEL.DEVICE cuda MODEL.FOCALSTAR.LOSS_TYPE CE MODEL.RETINANET.FOCAL_LOSS_ALPHA 0.5 \
          OUTPUT_DIR output/pretrain_shapes_detector &&
        "$PY" tools/pretrain_backbone.py --from-detector \
          output/pretrain_shapes_detector/model_final.pth --out output/pretrain_shapes_r18 || return 1
      fi
      local rc=0 cfg name pair pids=() p row i
      for cfg in "${ABLATION_CFGS[@]}"; do  # 1. the rate grid, seed 0: the step's two losses at once
        name=$(basename "$cfg" .yaml); pids=(); t=$(left)
        if [ "$t" -lt 30 ]; then echo "[gpu_checks] $step: $name not started, ${t} s left"; rc=1; break; fi
        for pair in "${ABLATION_PAIR[@]}"; do  # a folder each: a sweep locks its --out
          # shellcheck disable=SC2086  # $pair is sweep.py arguments
          timeout -k 20 "$t" "$PY" tools/sweep.py --config-file "$cfg" --jobs 5 $pair \
            --base-lrs "${PROXY80_RATES[@]}" --seeds 0 \
            --out "output/proxy80_ablation/${name}_$(echo "$pair" | cut -d' ' -f2)" \
            -- MODEL.DEVICE cuda DATALOADER.NUM_WORKERS 1 >>"output/proxy80_ablation_$name.log" 2>&1 &
          pids+=($!)
        done
        for p in "${pids[@]}"; do wait "$p" || rc=1; done
        tail -n 2 "output/proxy80_ablation_$name.log"
      done
      t=$(left)
      if [ "$t" -lt 30 ]; then echo "[gpu_checks] $step: seeds 1-2 not started, ${t} s left"; rc=1; fi
      pids=()
      for cfg in "${ABLATION_CFGS[@]}"; do  # 2. seeds 1-2 of each step's two rows at their rates
        [ "$t" -ge 30 ] || break
        name=$(basename "$cfg" .yaml); i=0
        while read -r row; do
          i=$((i + 1))
          # shellcheck disable=SC2086  # $row is the row's sweep.py arguments
          timeout -k 20 "$t" "$PY" tools/sweep.py --config-file "$cfg" --jobs 2 $row --seeds 1 2 \
            --out "output/proxy80_ablation/${name}_seeds_row$i" -- MODEL.DEVICE cuda \
            DATALOADER.NUM_WORKERS 1 >>"output/proxy80_ablation_${name}_seeds.log" 2>&1 &
          pids+=($!)
        done < <("$PY" tools/table1.py "output/proxy80_ablation/$name"_{CE,FL}/*/ --sweep-args)
      done
      for p in "${pids[@]}"; do wait "$p" || rc=1; done
      local A=output/proxy80_ablation R3=(output/proxy80_rates output/proxy80_table1/*)
      # a step that did not run (no folder matches) is a 'not run' row, not a literal glob
      shopt -s nullglob
      "$PY" tools/ablation.py \
        --step "round-2 proxy, the shared rate 0.01" $A/proxy_shapes_flstar_{CE,FL}/*_lr0.01/ \
        --step "round-2 proxy, each loss at its rate" $A/proxy_shapes_flstar_{CE,FL}/*/ \
          $A/proxy_shapes_flstar_seeds_row*/*/ \
        --step "+ 80 classes" $A/1_classes_{CE,FL}/*/ $A/1_classes_seeds_row*/*/ \
        --step "+ no clipping" $A/2_no_clipping_{CE,FL}/*/ $A/2_no_clipping_seeds_row*/*/ \
        --step "+ the round-3 trunk, frozen whole" $A/3_neutral_trunk_{CE,FL}/*/ \
          $A/3_neutral_trunk_seeds_row*/*/ \
        --step "+ 3,000 iterations of 16: the round-3 proxy" \
          $(find "${R3[@]}" -maxdepth 1 -type d \( -name 'ce_a0.75_*' -o -name 'fl_g2_a0.25_*' \) 2>/dev/null) \
        --out "$OUTDIR/proxy80_ablation" || rc=1
      shopt -u nullglob
      pack_study proxy80_ablation '3_neutral_trunk_*/*/'; return $rc ;;  # (compare.py: one step's runs)
  esac
}

failed=()
for step in "$@"; do
  run_step "$step"; rc=$?
  echo "[gpu_checks] $step: exit $rc after $(( $(date +%s) - START )) s in all"
  [ $rc -eq 0 ] || failed+=("$step")
done
ls -l "$OUTDIR"
if [ ${#failed[@]} -gt 0 ]; then echo "[gpu_checks] failed or cut off: ${failed[*]}"; exit 1; fi
echo "[gpu_checks] all steps passed"
