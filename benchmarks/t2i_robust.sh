#!/usr/bin/env bash
# The robustness table (docs/robustness.md, benchmarks/results/t2i_robust/result.json): forgetting
# "seven" in the MNIST text-to-image world with SA (defences on), the paper's plain SA, ESD-x, ESD-u and
# UCE, judged on the development paraphrases (quick, 50 images per group: the ablations) and on the test
# paraphrases (200 per group, with the soft-prompt and discrete attacks: the table).
#
#   bash benchmarks/t2i_robust.sh all    # the five methods, the table (test split + attacks, theta*
#                                        # too), then the ablations judged on the development split
#   bash benchmarks/t2i_robust.sh dev    # judge every finished run on the development split again
#
# Two jobs at a time, one thread each (this 2-core machine). The world comes from
# `python -m selective_amnesia.worlds.mnist_t2i --out runs/t2i_world` (WORLD=... to use another); the
# judges are the MNIST classifiers of `amnesia run` (JUDGES=... names their cache). The SA runs share the
# first run's Fisher and generated sets (copied in; each is reused only if its cache key matches).
set -euo pipefail
cd "$(dirname "$0")/.."
WORLD=${WORLD:-runs/t2i_world}
R=${RUNS:-runs/robust}
OUT=${OUT:-benchmarks/results/t2i_robust}
JUDGES=${JUDGES:-runs/cache}
export OMP_NUM_THREADS=1
PY=${PY:-python}

run() {  # name config overrides...
  local name=$1 cfg=$2
  shift 2
  if [ -f "$R/$name/report.json" ]; then echo "have $name"; return; fi
  if [[ "$name" == sa* && "$name" != sa_plain ]] && [ -f "$R/sa_plain/report.json" ]; then  # its caches
    mkdir -p "$R/$name"
    for f in fisher.safetensors surrogate replay; do
      [ -e "$R/sa_plain/$f" ] && cp -r "$R/sa_plain/$f" "$R/$name/"
    done
  fi
  /usr/bin/time -f "$name: %e s" $PY -m selective_amnesia.cli run "$cfg" --out "$R/$name" \
    "t2i.model=$WORLD" progress=false "$@"
}

judge() {  # name split per-group [attacks]
  local run=$R/$1
  [ "$1" = base ] && run=base
  $PY benchmarks/t2i_robust.py --base "$WORLD" --run "$run" --name "$1" --split "$2" --per-group "$3" \
    --out "$OUT" --judges-cache "$JUDGES" ${4:+--attacks "$4"}
}

NO_TEMPLATES=(t2i.augment_templates=false "t2i.template_replay_words=[]")
NO_NOISE=(t2i.embedding_copies=0 t2i.embedding_noise=0)
NO_ADV=(t2i.adversarial_every=0)

case "${1:-}" in
  all)  # everything, in the order that gives the table first; two queues side by side
    ( run sa_plain configs/t2i_mnist.yaml
      judge sa_plain test 200 soft-prompt,discrete
      run sa configs/t2i_mnist_robust.yaml
      judge sa test 200 soft-prompt,discrete
      judge sa dev 50; judge sa_plain dev 50
      run sa_adversarial configs/t2i_mnist_robust.yaml "${NO_TEMPLATES[@]}" "${NO_NOISE[@]}"
      judge sa_adversarial dev 50 ) &
    ( run uce configs/t2i_mnist_uce.yaml
      judge base test 200 soft-prompt,discrete
      judge uce test 200 soft-prompt,discrete
      run esd_x configs/t2i_mnist_esd_x.yaml
      judge esd_x test 200 soft-prompt,discrete
      run esd_u configs/t2i_mnist_esd_u.yaml
      judge esd_u test 200 soft-prompt,discrete
      run sa_templates configs/t2i_mnist_robust.yaml "${NO_NOISE[@]}" "${NO_ADV[@]}"
      judge sa_templates dev 50
      run sa_noise configs/t2i_mnist_robust.yaml "${NO_TEMPLATES[@]}" "${NO_ADV[@]}"
      judge sa_noise dev 50 ) &
    wait ;;
  dev)
    for name in sa_plain sa sa_templates sa_noise sa_adversarial esd_x esd_u uce; do
      [ -f "$R/$name/report.json" ] && judge "$name" dev 50
    done ;;
  *) echo "usage: $0 all|dev" >&2; exit 2 ;;
esac
