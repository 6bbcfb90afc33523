#!/bin/bash
# Rebuild every table and plot of docs/RESULTS.md from the result files committed under
# docs/results/ (nothing is trained; a few minutes on 2 cores, most of it the bootstrap):
#
#     bash tools/rebuild_results.sh            # or: make results
#
# Each line is the command RESULTS.md quotes beside its table. The older studies (study_cpu,
# study_gpu) kept no detections, so they get no intervals (compare.py names each such run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=docs/results

$PY tools/compare.py $R/study_gpu/*/ --out $R/compare_gpu
$PY tools/compare.py $R/study_cpu/*/ --out $R/compare_cpu
# the round-2 proxy study (issue 16, not calibrated): Table 1 and FL*, each setting against the
# best CE and FL g=2
$PY tools/compare.py $R/proxy_shapes/*/ --versus "CE alpha=0.75" --out $R/proxy_shapes_vs_ce
$PY tools/compare.py $R/proxy_shapes/*/ --versus "FL g=2" --out $R/proxy_shapes_vs_fl
$PY tools/table1.py $R/proxy_shapes/*/ --out $R/proxy_shapes_table1
# the schedule-length variation (2.5x iterations)
$PY tools/compare.py $R/proxy_shapes_long/*/ --versus "CE alpha=0.75" --out $R/proxy_shapes_long_vs_ce
$PY tools/compare.py $R/proxy_shapes_long/*/ --versus "FL g=2" --out $R/proxy_shapes_long_vs_fl
# the COCO-imbalance proxy (issue 23): its set-up tables (imbalance, the cost of each speed lever)
# and the first CE-vs-FL pair with its interval
$PY tools/proxy80_tables.py --anchor-stats $R/anchor_stats/*.txt \
  --cost docs/benchmarks/benchmark_proxy_cpu_2026-12-07.json --out $R/proxy80_setup.md
$PY tools/compare.py $R/proxy80/*/ --versus "CE" --out $R/proxy80_vs_ce
# the pair's checkpoints at iterations 1000 and 2000 (train_net.py --eval-only), then where each
# run's AP goes (found vs named)
for IT in 1000 2000; do
  $PY tools/compare.py $R/proxy80_curve/*_it$IT/ --versus "CE alpha=0.75" --out $R/proxy80_curve_vs_ce_it$IT
done
# each loss on its short rate grid (and FL on an alpha grid), each against CE alpha 0.75 at 0.005
$PY tools/compare.py $R/proxy80/*/ $R/proxy80_levers/*/ --versus "CE" --out $R/proxy80_levers_vs_ce
$PY tools/diagnose_runs.py $R/proxy80/*/ $R/proxy80_levers/*/ $R/proxy80_seeds/*/ $R/proxy80_table1_rows/*/ \
  $R/proxy80_curve/*/ \
  --name-parts colour fill shape --out $R/proxy80_diagnostics
# the pair's seeds (FL g=2 at 0.02, CE alpha 0.75 at 0.005; a diverged seed is named and skipped),
# and Table 1 as far as it is run: each row at its best rate among the kept runs, diverged seeds
# counted
$PY tools/compare.py $R/proxy80/ce_a0.75_s0/ $R/proxy80_levers/fl_g2_a0.25_s0_lr0.02/ \
  $R/proxy80_seeds/*/ --versus "CE lr=0.005 alpha=0.75" --out $R/proxy80_seeds_vs_ce
$PY tools/table1.py $R/proxy80/*/ $R/proxy80_levers/*/ $R/proxy80_seeds/*/ $R/proxy80_table1_rows/*/ \
  --out $R/proxy80_table1
# FL's gamma profile at one shared rate, 0.01 (seed 0): gamma 1, 2 and 5, each against gamma 2
$PY tools/compare.py $R/proxy80_levers/fl_g2_a0.25_s0_lr0.01/ $R/proxy80_table1_rows/fl_g[15]_a0.25_s0_lr0.01/ \
  --versus "FL g=2" --out $R/proxy80_gamma_at_0.01
# the ablation of the FL-vs-CE gap from the round-2 proxy to the round-3 one (seed 0; the three
# steps between are configs/proxy80_ablation/; on the CPU at the round-2 rate 0.01, CE also lower
# where it diverged; tools/gpu_checks.sh proxy80-ablation runs a rate grid and more seeds). The
# round-2 proxy at 1,500 iterations, a schedule lever off this chain, is proxy_shapes_long_vs_ce.
A=$R/proxy80_ablation
$PY tools/ablation.py \
  --step "round-2 proxy (4 classes, clipping, CE-trained trunk, 600 it of 8, warm-up 50), at 0.01" \
    $R/proxy_shapes/ce_a0.75_s*/ $R/proxy_shapes/fl_g2_s*/ \
  --step "+ 80 classes, at 0.01" $A/1_classes/*/ \
  --step "+ no clipping (CE at 4 rates)" $A/2_no_clipping/*/ \
  --step "+ the round-3 trunk, frozen whole (CE at 4 rates)" $A/3_neutral_trunk/*/ \
  --step "+ 3,000 it of 16, warm-up 300: the round-3 proxy, at 0.01" \
    $R/proxy80_levers/ce_a0.75_s0_lr0.01/ $R/proxy80_levers/fl_g2_a0.25_s0_lr0.01/ \
  --step "the round-3 proxy at 0.005, CE's highest rate there" $R/proxy80/*/ \
  --step "the round-3 proxy, each loss at its best rate (more seeds)" \
    $R/proxy80/*/ $R/proxy80_levers/*/ $R/proxy80_seeds/*/ \
  --out $R/proxy80_ablation_table
# Table 1 on the committed trunk (weights/proxy80_trunk.pth) with the 1,000-iteration warm-up for
# every loss: the pair, seed 0, each loss at the rate it had on the lost trunk
$PY tools/compare.py $R/proxy80_trunk_w1000/*/ --versus "CE" --out $R/proxy80_trunk_w1000_vs_ce
$PY tools/table1.py $R/proxy80_trunk_w1000/*/ --out $R/proxy80_trunk_w1000_table1
