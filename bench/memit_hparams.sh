#!/usr/bin/env bash
# The validated YAMLs bench/mass_edit.py reads: `bench/memit_hparams.sh ALG MODEL...` with ALG MEMIT, AlphaEdit or
# ROME and MODEL gpt2, llama (shipped: hparams/ALG/fact-MODEL.yaml) or a folder name of local_fact_models/
# (bench/results/memit/MODEL[-alg].yaml). Each run's output goes to bench/results/memit/hparams-MODEL-ALG.log.
set -u
cd "$(dirname "$0")/.."
mkdir -p bench/results/memit hparams/MEMIT hparams/AlphaEdit
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
alg=$1; shift
for fam in "$@"; do
  case $fam in
    gpt2|llama) m=rome_locate/fact_models/$fam; o=hparams/$alg/fact-$fam.yaml;;
    *) m=local_fact_models/$fam; o=bench/results/memit/$fam$([ "$alg" = MEMIT ] || echo "-$alg" | tr A-Z a-z).yaml;;
  esac
  # AlphaEdit's grid (12 settings x up to 12 windows) needs 3000 for one batch of 10 per configuration.
  case $alg in ROME) b=300;; AlphaEdit) b=3000;; *) b=2000;; esac
  budget=${BUDGET:-$b}
  rome-locate hparams --model $m --model-name ./$m --facts $m/counterfact.json --alg $alg -o $o \
    --stats-dir ./$m/stats --budget $budget ${EXTRA:-} --quiet > bench/results/memit/hparams-$fam-$alg.log 2>&1
  echo "$fam $alg exit $?" >> bench/results/memit/hparams.done
done
