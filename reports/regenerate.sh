#!/usr/bin/env bash
# Regenerates every committed demo-scale report and the README's demo figures from the current code, in the
# order the README cites them. CPU, offline; about 15-25 minutes on 2 cores. Run from the repository root after
# `make setup`:  bash reports/regenerate.sh [demo|orderings|qaware|qid|real ...]   (default: the first four;
# `real`, the real-weights study on Gemma 3 270M, takes one to two hours at one thread and is run only when named)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(demo ship orderings qaware qid)

for step in "${steps[@]}"; do
  case "$step" in
    demo)  # `make demo` with --record: reports/demo/headline.json and the README block rendered from it
      $PY -m kaggle_utils demo --out runs/demo --record
      ;;
    ship)  # what the demo shipped and why (needs the demo run): the ranked candidates and the reliability diagram
      mkdir -p reports/demo_ship
      cp runs/demo/orderings/{report.md,report.json,ship.json,reliability.png} reports/demo_ship/
      [ ! -f runs/demo/orderings/shipped/manifest.json ] || \
        cp runs/demo/orderings/shipped/manifest.json reports/demo_ship/shipped_manifest.json
      ;;
    orderings)  # both orderings over three seeds on the demo's own data and folds (needs the demo run)
      $PY -m kaggle_utils compare-orderings --config kaggle_utils/resources/compare_demo.yaml \
        --train runs/demo/data/train.csv --folds runs/demo/folds.parquet --seeds 1 2 3 --threads 1 \
        --out runs/bench/compare_orderings_demo
      mkdir -p benchmarks/results/compare_orderings_demo
      cp runs/bench/compare_orderings_demo/report.{json,md,png} benchmarks/results/compare_orderings_demo/
      ;;
    qaware)  # every quantization variant that runs on this machine, three seeds
      $PY -m kaggle_utils compare-orderings --config reports/compare_qaware_config.yaml --sample-rows 800 \
        --out runs/reports/compare_qaware --seeds 42 43 44 \
        --variants quant-then-ft ft-then-quant-int8 ft-then-quant-nf4 apiq-init loftq qa-lora-merged \
        qa-hira-merged --threads 1
      cp runs/reports/compare_qaware/report.{json,md,png} reports/compare_qaware/
      ;;
    qid)  # QiD against fine-tuning tokens
      $PY -m kaggle_utils qid-study --config reports/qid_study_config.yaml --out runs/reports/qid_study \
        --sample-rows 800 --checkpoints 6 --first-step 4 --bootstrap 1000 --threads 1 --seeds 42 43 44 \
        --schemes int8 nf4
      cp runs/reports/qid_study/{qid_study.json,qid_study.md,qid_study.png,COMMAND.txt} reports/qid_study/
      ;;
    real)  # real weights: Gemma 3 270M with its own tokenizer; two batches on the same folds/seed, then joined
      [ -d models/gemma-3-270m ] || $PY -m kaggle_utils fetch-model gemma-3-270m --out models/gemma-3-270m
      $PY -m kaggle_utils compare-orderings --config reports/real_weights_config.yaml --sample-rows 320 \
        --out runs/reports/real_weights_a --seeds 42 --threads 1 \
        --variants ft-then-quant-int8 ft-then-quant-nf4 quant-then-ft-int8 quant-then-ft-nf4
      $PY -m kaggle_utils compare-orderings --config reports/real_weights_config.yaml --sample-rows 320 \
        --out runs/reports/real_weights_b --seeds 42 --threads 1 --variants qa-lora-merged loftq
      $PY -m kaggle_utils combine-reports runs/reports/real_weights_a runs/reports/real_weights_b \
        --out runs/reports/real_weights
      mkdir -p reports/real_weights
      cp runs/reports/real_weights/report.{json,md,png} reports/real_weights/
      ;;
    *) echo "unknown step $step (demo, ship, orderings, qaware, qid, real)" >&2; exit 2 ;;
  esac
done
