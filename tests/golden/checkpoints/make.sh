#!/usr/bin/env bash
# Regenerate the checkpoint fixtures in this folder from fixture.yaml (run from the repository root):
#   one-process/   a one-process run of 3 steps stopped after step 2: step-0000002/ and `latest`
#   finished/      the same run to the end: step-0000003/ and the final/ export
#   tp2-pp2/       the same run at tp=2 × pp=2 (torchrun, 4 gloo ranks): sharded step-0000003/ and final/
# then `BMOJO_UPDATE_GOLDEN=1 python -m pytest -q tests/test_checkpoint_fixtures.py` records the expected numbers.
# The files are a record of the on-disk format that every later version must keep reading: regenerate them
# only to add a format, never to replace one.
set -euo pipefail
export BMOJO_OPS_BACKEND=torch  # the torch reference ops, as tests/test_checkpoint_fixtures.py runs them
here=tests/golden/checkpoints
rm -rf "$here/one-process" "$here/finished" "$here/tp2-pp2"
python - "$here" <<'PY'
import sys
from pathlib import Path
from bmojo_neuron.recipes import load_recipe
from bmojo_neuron.training import train
here = Path(sys.argv[1])
recipe = load_recipe(str(here / "fixture.yaml"))
train(recipe, here / "one-process", progress=False, stop_after=2)
train(recipe, here / "finished", progress=False)
PY
OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 -m bmojo_neuron.cli train "$here/fixture.yaml" parallel.tp=2 \
    parallel.pp=2 parallel.microbatches=2 --output-dir "$here/tp2-pp2" --no-progress
for run in one-process finished tp2-pp2; do
    rm -rf "$here/$run/tensorboard" "$here/$run"/*.png "$here/$run/.lock"
done
