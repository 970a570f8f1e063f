#!/usr/bin/env bash
# Regenerate every committed compare result and the tables from a clean tree (the provenance of each raw record is its
# commit): `bash results/regenerate.sh` from the repository root, with the venv of `make install`.  About 50 minutes on
# 2 cores.  The old compare records are removed once the new ones are written (selftest / calibration records are
# kept: `harness calibrate` regenerates those).  Exit code 1 of a compare (a row that fails) is a result and is kept;
# exit code 2 stops here.
set -u
H=${HARNESS:-.venv/bin/harness}
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "the tree has uncommitted changes: commit first, so that every record names the code that produced it" >&2
  exit 2
fi
old=()  # the compare records this run replaces: removed at the end (a removed tracked file would make the tree dirty)
for f in results/raw/*.json; do
  grep -q '"kind": "selftest"' "$f" || old+=("$f")
done
run() {
  echo "== harness compare $*"
  "$H" compare "$@"
  rc=$?
  if [ "$rc" -ge 2 ]; then echo "stopped: exit code $rc" >&2; exit "$rc"; fi
}
# timed, at each model's own dtype and batch sizes, every backend
for m in mlp_431 perceptron_or pima_mlp mnist_mlp mnist_cnn mnist_bn_cnn; do run --model "$m"; done
run --model mnist_mlp --fast --backends jax,tf2
# agreement only: long float64 / float32 trajectories
run --model mlp_431 --dtype float64 --steps 6000 --no-timing
run --model perceptron_or --batch-sizes 4 --steps 101 --no-timing  # the tutorial's 100 updates (+1: the last loss)
run --model mlp_431 --dtype float32 --steps 600 --no-timing
run --model pima_mlp --dtype float64 --steps 2000 --no-timing
run --model pima_mlp --dtype float32 --steps 2000 --no-timing
run --model mnist_mlp --dtype float64 --steps 100 --no-timing
run --model mnist_cnn --dtype float64 --steps 20 --no-timing
run --model mnist_bn_cnn --dtype float64 --steps 20 --no-timing
# the defaults audit
run --model pima_mlp --mode native --steps 100 --no-timing
run --model mnist_mlp --mode native --steps 20 --no-timing
run --model mnist_cnn --mode native --steps 10 --no-timing
run --model mnist_bn_cnn --mode native --steps 10 --no-timing
run --model examples/bn_audit.py --mode native --steps 10 --no-timing
run --model examples/bn_audit.py --steps 10 --no-timing
# other seeds (issue 11: verdicts must not depend on the seed)
run --model pima_mlp --seed 38 --steps 12 --no-timing
run --model mnist_bn_cnn --seed 38 --steps 12 --no-timing
run --model mnist_mlp --dtype float64 --seed 3 --batch-sizes 1 --steps 12 --no-timing
# the porting-hazards atlas (results/hazards.md)
echo "== harness hazards"
"$H" hazards
rc=$?
if [ "$rc" -ge 2 ]; then echo "stopped: exit code $rc" >&2; exit "$rc"; fi
for f in "${old[@]}"; do rm -f "$f" "${f%.json}.npz"; done
"$H" report
