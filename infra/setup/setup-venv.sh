#!/usr/bin/env bash
# Create a virtual environment for bmojo-neuron on a Trn1 instance.
#
#   infra/setup/setup-venv.sh [--dry-run] [VENV_DIR]
#
# Meant for the Neuron DLAMI "Deep Learning AMI Neuron PyTorch 2.9 (Ubuntu 24.04)"
# of Neuron SDK 2.28, whose Neuron driver, runtime and collectives match the pinned
# Python packages (docs/trn1.md). The venv gets this checkout installed editable
# with the `neuron` extra, i.e. the exact SDK 2.28 pins of pyproject.toml, from
# AWS's Neuron pip repository (PyPI only holds placeholders under those names),
# and the `s3` extra (boto3, for `bmojo-neuron cache push/pull`).
# torch comes in as torch-neuronx's dependency (torch 2.9): never pre-install
# torch==2.13.0 here, that is the CPU recipe of the README.
#
# Arguments and environment:
#   VENV_DIR            where to create the venv (default: $BMOJO_VENV, else ~/bmojo-venv);
#                       an existing venv is reused and updated
#   --dry-run           print the commands, run nothing
#   PYTHON              interpreter for the venv, Python 3.10-3.12 (default: python3.12 if
#                       present, else python3)
#   NEURON_PIP_INDEX    the Neuron pip repository (default https://pip.repos.neuron.amazonaws.com)
#
# Afterwards: `source VENV_DIR/bin/activate` (infra/slurm/train.sbatch does it via BMOJO_VENV).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "setup-venv.sh: error: $*" >&2; exit 1; }
warn() { echo "setup-venv.sh: warning: $*" >&2; }

dry_run=0
venv=""
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        -n | --dry-run) dry_run=1 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z $venv ]] || die "more than one VENV_DIR given: $venv and $1"; venv=$1 ;;
    esac
    shift
done
venv=${venv:-${BMOJO_VENV:-$HOME/bmojo-venv}}
index=${NEURON_PIP_INDEX:-https://pip.repos.neuron.amazonaws.com}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[[ -f $repo/pyproject.toml ]] || die "no pyproject.toml in $repo: run this script from a bmojo-neuron checkout"

if [[ -n ${PYTHON:-} ]]; then
    python=$PYTHON
elif python3.12 -c '' 2> /dev/null; then  # runs, not just on PATH (a pyenv shim may not)
    python=python3.12
else
    python=python3
fi
"$python" -c '' 2> /dev/null || die "$python does not run (set PYTHON to a Python 3.10, 3.11 or 3.12)"
# The Neuron SDK 2.28 wheels exist for Python 3.10-3.12 only (n2-manifest.json, docs/trn1.md):
# any other version fails here rather than deep inside pip's resolver.
"$python" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))' \
    || die "$python is Python $("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); the Neuron SDK 2.28 packages need 3.10, 3.11 or 3.12 (set PYTHON)"

# Environment checks: warnings only, so the venv can also be built on a machine without the devices.
if [[ -r /etc/os-release ]]; then
    # shellcheck source=/dev/null
    os=$(. /etc/os-release && echo "${ID:-?} ${VERSION_ID:-?}")
    [[ $os == "ubuntu 24.04" ]] || warn "this is $os; Neuron SDK 2.28 ships torch-neuronx 2.9 for Ubuntu 24.04"
fi
compgen -G '/dev/neuron*' > /dev/null \
    || warn "no /dev/neuron* devices: the Neuron driver is missing or this is not a Trn1 instance (training will not run here)"

run() {
    printf '+'; printf ' %q' "$@"; printf '\n'
    ((dry_run)) || "$@"
}

if [[ -x $venv/bin/python ]]; then
    echo "reusing the virtual environment $venv"
else
    run "$python" -m venv "$venv"
fi
vpython=$venv/bin/python
run "$vpython" -m pip install --upgrade pip
# The exact SDK 2.28 pins come from the `neuron` extra; torch 2.9 from torch-neuronx's requirement.
run "$vpython" -m pip install -e "${repo}[neuron,s3]" --extra-index-url "$index"

if ((dry_run)); then
    echo "+ $venv/bin/bmojo-neuron info"
    exit 0
fi

"$venv/bin/bmojo-neuron" info
# The SDK 2.28 torch, and every Neuron package importable (not a PyPI placeholder).
"$vpython" - "$venv/bin/bmojo-neuron" << 'EOF' || die "the Neuron stack did not install correctly (see above)"
import json, subprocess, sys

import torch

problems = []
if not torch.__version__.startswith("2.9"):
    problems.append(f"torch {torch.__version__}: torch-neuronx 2.9.0 needs torch 2.9 (was another torch installed?)")
report = subprocess.run([sys.argv[1], "info", "--json"], check=True, capture_output=True, text=True).stdout
problems += [f"{name}: {status['reason']}" for name, status in json.loads(report)["neuron"].items()
             if not status["importable"]]
if problems:
    sys.exit("  " + "\n  ".join(problems))
EOF
echo "ready: source $venv/bin/activate"
