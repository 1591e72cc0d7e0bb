#!/usr/bin/env bash
# Regenerates every committed demo-scale report and the README's demo figures from the current code, in the
# order the README cites them. CPU, offline; about 15-25 minutes on 2 cores. Run from the repository root after
# `make setup`:  bash reports/regenerate.sh [demo|ship|orderings|qaware|qid|real|real-ship|levers|levers-seeds|real-levers ...]
# (default: the first five; `real` and `real-levers`, on Gemma 3 270M, take one to two hours at one thread, and
# `levers` needs the GPTQ extra: those three run only when named)
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
    real-ship)  # the ship decision on real weights (Gemma 3 270M): two variants, every candidate, one seed
      [ -d models/gemma-3-270m ] || $PY -m kaggle_utils fetch-model gemma-3-270m --out models/gemma-3-270m
      $PY -m kaggle_utils compare-orderings --config reports/real_weights_config.yaml --sample-rows 320 \
        --out runs/reports/real_ship --seeds 42 --threads 1 --variants ft-then-quant-int8 quant-then-ft-nf4
      mkdir -p reports/real_weights_ship
      cp runs/reports/real_ship/{report.json,report.md,report.png,ship.json,reliability.png} reports/real_weights_ship/
      ;;
    levers)  # the winners' levers at demo scale, every run on the first batch's data and folds (needs the GPTQ
      # extra: `make gptq-check` installs it into .gptq-extra/). About 25 minutes at one thread.
      L=runs/reports/levers CFG=kaggle_utils/resources/compare_demo.yaml
      COMPARE=(env PYTHONPATH=.gptq-extra $PY -m kaggle_utils compare-orderings --config $CFG --threads 1)
      SAME=(--train $L/quant/data/train.csv --folds $L/quant/folds.parquet --variants ft-then-quant-int8)
      TEACHER=(--set train.teacher_name=ft-then-quant-int8/seed42/16bit)
      "${COMPARE[@]}" --sample-rows 2000 --out $L/quant --set qaware.gptq_group_size=32 --variants \
        ft-then-quant-int8 ft-then-quant-gptq8 ft-then-quant-nf4 ft-then-quant-gptq4 full-then-quant
      # Teachers: 3 epochs. "leaky": OOF of folds 1-4 from models that trained on fold 0, the students' held-out
      # fold; "nested": fold 0 left out of the teacher's experiment altogether (train.exclude_folds).
      "${COMPARE[@]}" "${SAME[@]}" --out $L/teacher_leaky --set "train.cv_folds=[1,2,3,4]" --set train.epochs=3
      "${COMPARE[@]}" "${SAME[@]}" --out $L/teacher_nested --set "train.exclude_folds=[0]" \
        --set "train.cv_folds=[1,2,3,4]" --set train.epochs=3
      for kind in leaky nested; do  # the leaky teacher saw fold 0: training refuses it unless the leak is allowed
        LEAK=(); [ $kind = nested ] || LEAK=(--set train.teacher_allow_leak=true)
        "${COMPARE[@]}" "${SAME[@]}" --out $L/distilled_$kind "${TEACHER[@]}" "${LEAK[@]}" \
          --set train.teacher_path=$L/teacher_$kind/oof.parquet
      done
      "${COMPARE[@]}" "${SAME[@]}" --out $L/smoothed --set train.label_smoothing=0.1
      # Pseudo-labels: 1,000 "external" conversations (generated with another seed; their labels are not used)
      # labelled by the nested teacher's fold-1 model (it never saw fold 0: declared as fold 0's teacher); the
      # most confident half, minus prompts already in train, joins each training part.
      $PY -m kaggle_utils demo --baseline-only --n-train 1000 --n-test 10 --seed 7 --out $L/external \
        --submission $L/external/submission.csv
      $PY -m kaggle_utils predict --artifact $L/teacher_nested/runs/seed42/ft-then-quant-int8/fold1/artifact \
        --test $L/external/data/train.csv --out $L/pseudo/teacher_external.csv
      $PY -m kaggle_utils pseudo-label --teacher 0=$L/pseudo/teacher_external.csv --folds $L/quant/folds.parquet \
        --unlabelled $L/external/data/train.csv --train $L/quant/data/train.csv --top-fraction 0.5 \
        --out $L/pseudo/pseudo.parquet | tee $L/pseudo/pseudo_label.txt
      "${COMPARE[@]}" "${SAME[@]}" --out $L/pseudo --set train.pseudo_path=$L/pseudo/pseudo.parquet
      $PY -m kaggle_utils lever-table plain=$L/quant:ft-then-quant-int8 gptq8=$L/quant:ft-then-quant-gptq8 \
        nf4=$L/quant:ft-then-quant-nf4 gptq4=$L/quant:ft-then-quant-gptq4 full=$L/quant:full-then-quant \
        distilled-nested=$L/distilled_nested:ft-then-quant-int8 \
        distilled-leaky=$L/distilled_leaky:ft-then-quant-int8 smoothed=$L/smoothed:ft-then-quant-int8 \
        pseudo-labels=$L/pseudo:ft-then-quant-int8 --out $L
      for run in quant teacher_leaky teacher_nested distilled_leaky distilled_nested smoothed pseudo; do
        mkdir -p reports/levers/$run && cp $L/$run/report.{json,md} reports/levers/$run/
      done
      cp $L/levers.{json,md} reports/levers/ && cp $L/pseudo/pseudo_label.txt reports/levers/pseudo/
      ;;
    levers-seeds)  # distillation's gain, leaky vs nested teacher, at two more seeds (needs the `levers` step's data)
      L=runs/reports/levers CFG=kaggle_utils/resources/compare_demo.yaml
      for seed in 43 44; do
        S=$L/seed$seed
        RUN=($PY -m kaggle_utils compare-orderings --config $CFG --threads 1 --seeds $seed --train $L/quant/data/train.csv
             --folds $L/quant/folds.parquet --variants ft-then-quant-int8)
        "${RUN[@]}" --out $S/plain
        "${RUN[@]}" --out $S/teacher_leaky --set "train.cv_folds=[1,2,3,4]" --set train.epochs=3
        "${RUN[@]}" --out $S/teacher_nested --set "train.exclude_folds=[0]" --set "train.cv_folds=[1,2,3,4]" \
          --set train.epochs=3
        for kind in leaky nested; do  # the leaky teacher saw fold 0: allowed here, to measure the leak
          LEAK=(); [ $kind = nested ] || LEAK=(--set train.teacher_allow_leak=true)
          "${RUN[@]}" --out $S/distilled_$kind --set train.teacher_path=$S/teacher_$kind/oof.parquet \
            --set train.teacher_name=ft-then-quant-int8/seed$seed/16bit "${LEAK[@]}"
        done
        $PY -m kaggle_utils lever-table plain=$S/plain:ft-then-quant-int8 \
          distilled-nested=$S/distilled_nested:ft-then-quant-int8 \
          distilled-leaky=$S/distilled_leaky:ft-then-quant-int8 --out $S
        mkdir -p reports/levers/seed$seed && cp $S/levers.{json,md} reports/levers/seed$seed/
      done
      ;;
    real-levers)  # the levers that run in about an hour each on Gemma 3 270M: GPTQ vs round-to-nearest, full vs
      # LoRA, label smoothing, distillation; the real-weights study's config, data size, fold and seed. About two
      # hours at one thread.
      [ -d models/gemma-3-270m ] || $PY -m kaggle_utils fetch-model gemma-3-270m --out models/gemma-3-270m
      R=runs/reports/real_levers
      COMPARE=(env PYTHONPATH=.gptq-extra $PY -m kaggle_utils compare-orderings
               --config reports/real_weights_config.yaml --seeds 42 --threads 1)
      "${COMPARE[@]}" --sample-rows 320 --out $R/a \
        --variants ft-then-quant-int8 ft-then-quant-gptq8 ft-then-quant-gptq4 full-then-quant
      SAME=(--train $R/a/data/train.csv --folds $R/a/folds.parquet --variants ft-then-quant-int8)
      "${COMPARE[@]}" "${SAME[@]}" --out $R/smoothed --set train.label_smoothing=0.1
      # The teacher: the pipeline's feature baseline (stronger than 32 LoRA steps at this size), on nested folds:
      # fold 0, the students' held-out fold, left out altogether.
      $PY -m kaggle_utils baseline --train $R/a/data/train.csv --folds $R/a/folds.parquet --exclude-folds 0 \
        --oof $R/teacher_baseline/oof.parquet
      "${COMPARE[@]}" "${SAME[@]}" --out $R/distilled --set train.teacher_path=$R/teacher_baseline/oof.parquet
      # NF4 round-to-nearest comes from the `real` step's batch (same data, folds and seed) when it was run
      NF4=(); [ ! -f runs/reports/real_weights_a/report.json ] || NF4=(nf4=runs/reports/real_weights_a:ft-then-quant-nf4)
      $PY -m kaggle_utils lever-table plain=$R/a:ft-then-quant-int8 gptq8=$R/a:ft-then-quant-gptq8 \
        gptq4=$R/a:ft-then-quant-gptq4 "${NF4[@]}" full=$R/a:full-then-quant \
        smoothed=$R/smoothed:ft-then-quant-int8 distilled-from-baseline=$R/distilled:ft-then-quant-int8 --out $R
      for run in a smoothed distilled; do
        mkdir -p reports/real_levers/$run && cp $R/$run/report.{json,md} reports/real_levers/$run/
      done
      cp $R/a/report.png reports/real_levers/a/ && cp $R/levers.{json,md} reports/real_levers/
      ;;
    *) echo "unknown step $step (demo, ship, orderings, qaware, qid, real, levers, levers-seeds, real-levers)" >&2; exit 2 ;;
  esac
done
