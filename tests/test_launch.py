"""The launch/ scripts: syntax, usage, and what --dry-run prints (no gcloud, kubectl or SLURM needed).

local_multi.sh also runs for real here, with a stand-in for jaxsft (JAXSFT_BIN), to check how it
starts, logs and stops its processes; a 2-process training run through it is tested elsewhere.
"""

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["local.sh", "local_multi.sh", "tpu_vm.sh", "gke_jobset.sh", "slurm.sbatch"]
CONFIG = ROOT / "configs" / "demo.yaml"
JAXSFT = ".venv/bin/jaxsft" if os.access(ROOT / ".venv" / "bin" / "jaxsft", os.X_OK) else "jaxsft"
BASH = shutil.which("bash")
CD = f"cd {shlex.quote(str(ROOT))} && "
# Arguments each script needs besides the config.
REQUIRED = {"tpu_vm.sh": ["--tpu", "my-tpu", "--zone", "us-east5-a"],
            "gke_jobset.sh": ["--image", "img:1", "--tpu-type", "v5p-16"]}


def launch(script: str, *args: str, cwd: Path | None = None, env: dict | None = None,
           timeout: float = 30) -> subprocess.CompletedProcess:
    """Runs launch/SCRIPT with bash, outside the test process's XLA_FLAGS and DRY_RUN."""
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DRY_RUN", "JAXSFT_BIN")}
    return subprocess.run([BASH, str(LAUNCH / script), *args], cwd=cwd or ROOT, env=environ | (env or {}),
                          capture_output=True, text=True, timeout=timeout)


def lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


# --------------------------------------------------------------------------- every script

@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(script):
    result = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_header_comment(script):
    header = []
    for line in (LAUNCH / script).read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line[2:] if line.startswith("# ") else line[1:])
    for flag in ("-h", "--help"):
        out = lines(launch(script, flag))
        assert out == header
    assert header[0].startswith(f"launch/{script}: ") and any("--dry-run" in h or "DRY_RUN" in h for h in header)


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_config_is_a_usage_error(script):
    result = launch(script, *REQUIRED.get(script, []))
    assert result.returncode == 2
    assert "missing" in result.stderr and "CONFIG.yaml" in result.stderr
    assert f"launch/{script}: " in result.stderr  # the usage follows the message
    assert result.stdout == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_option_is_a_usage_error(script):
    args = [*REQUIRED.get(script, []), "--bogus", str(CONFIG)]
    if script == "gke_jobset.sh":
        args += ["--config", "c.yaml"]
    result = launch(script, *args)
    assert result.returncode == 2 and "unknown option: --bogus" in result.stderr


@pytest.mark.parametrize("script", ["local.sh", "local_multi.sh", "tpu_vm.sh", "slurm.sbatch"])
def test_missing_config_file_names_the_path(script, tmp_path):
    result = launch(script, *REQUIRED.get(script, []), "--dry-run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and f"config not found: {tmp_path / 'nope.yaml'}" in result.stderr


# --------------------------------------------------------------------------- local.sh

def test_local_dry_run(tmp_path):
    # From another directory, with the config named from there: it runs in the repository root.
    out = lines(launch("local.sh", "--dry-run", os.path.relpath(CONFIG, tmp_path), "train.steps=3", "a.b=x y",
                       cwd=tmp_path))
    assert out == [CD + shlex.join([JAXSFT, "train", "configs/demo.yaml", "train.steps=3", "a.b=x y"])]


def test_local_fake_devices_replace_the_callers_device_count():
    out = lines(launch("local.sh", "--devices", "8", str(CONFIG), "--dry-run",
                       env={"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"}))
    assert out == [CD + shlex.join(["env", "JAX_PLATFORMS=cpu",
                                    "XLA_FLAGS=--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8",
                                    JAXSFT, "train", "configs/demo.yaml"])]
    assert launch("local.sh", "--devices", "0", str(CONFIG)).returncode == 2


# --------------------------------------------------------------------------- local_multi.sh

def test_local_multi_dry_run_prints_one_command_per_process():
    out = lines(launch("local_multi.sh", "-n", "3", "--devices-per-process", "4", "--port", "23456", "--dry-run",
                       str(CONFIG), "train.steps=3"))
    assert len(out) == 4 and out[3] == "# logs: launch-logs/process_<i>.log; process 0 also to the terminal"
    for i, line in enumerate(out[:3]):
        assert line == CD + shlex.join([
            "env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4",
            "JAXSFT_COORDINATOR=localhost:23456", "JAXSFT_NUM_PROCESSES=3", f"JAXSFT_PROCESS_ID={i}",
            JAXSFT, "train", "configs/demo.yaml", "train.steps=3"])
    env = [dict(w.split("=", 1) for w in shlex.split(line)[4:10] if "=" in w) for line in out[:3]]
    assert [e["JAXSFT_PROCESS_ID"] for e in env] == ["0", "1", "2"]
    assert {e["JAXSFT_COORDINATOR"] for e in env} == {"localhost:23456"}


def test_local_multi_gpu_splits_the_gpus():
    out = lines(launch("local_multi.sh", "--platform", "cuda", "--devices-per-process", "2", "--dry-run", str(CONFIG)))
    assert [shlex.split(line)[5] for line in out[:2]] == ["CUDA_VISIBLE_DEVICES=0,1", "CUDA_VISIBLE_DEVICES=2,3"]
    assert all("XLA_FLAGS" not in line for line in out)


FAKE_JAXSFT = """#!/usr/bin/env bash
# Stands in for jaxsft: says who it is, then behaves as $FAKE_<process id> says.
echo "process $JAXSFT_PROCESS_ID of $JAXSFT_NUM_PROCESSES at $JAXSFT_COORDINATOR in $PWD: $*"
echo $$ > "$FAKE_PIDS/$JAXSFT_PROCESS_ID"
behaviour="FAKE_$JAXSFT_PROCESS_ID"
case "${!behaviour:-}" in
  fail) sleep 0.5; echo "process $JAXSFT_PROCESS_ID fails" >&2; exit 3 ;;
  hang) exec sleep 60 ;;
esac
"""


@pytest.fixture
def fake_jaxsft(tmp_path):
    fake = tmp_path / "fake-jaxsft"
    fake.write_text(FAKE_JAXSFT)
    fake.chmod(0o755)
    (tmp_path / "pids").mkdir()
    return {"JAXSFT_BIN": str(fake), "FAKE_PIDS": str(tmp_path / "pids")}


def test_local_multi_runs_all_processes_and_logs_each(fake_jaxsft, tmp_path):
    logs = tmp_path / "logs"
    result = launch("local_multi.sh", "-n", "3", "--log-dir", str(logs), str(CONFIG), "train.steps=3",
                    env=fake_jaxsft)
    assert result.returncode == 0, result.stderr
    for i in range(3):
        assert (logs / f"process_{i}.log").read_text() == (
            f"process {i} of 3 at localhost:12355 in {ROOT}: train configs/demo.yaml train.steps=3\n")
    assert result.stdout == (logs / "process_0.log").read_text()  # process 0 also on the terminal
    assert f"all 3 processes finished; logs in {logs}/" in result.stderr


def test_local_multi_stops_the_others_when_one_fails(fake_jaxsft, tmp_path):
    start = time.monotonic()
    result = launch("local_multi.sh", "-n", "3", "--log-dir", str(tmp_path / "logs"), str(CONFIG),
                    env=fake_jaxsft | {"FAKE_0": "hang", "FAKE_1": "fail", "FAKE_2": "hang"})
    assert result.returncode == 3
    assert time.monotonic() - start < 20  # not the 60 s the others would sleep
    assert "process 1 exited with status 3" in result.stderr
    assert "process 1 fails" in (tmp_path / "logs" / "process_1.log").read_text()
    for i in (0, 2):
        pid = int((Path(fake_jaxsft["FAKE_PIDS"]) / str(i)).read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_local_multi_ctrl_c_stops_all(fake_jaxsft, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | fake_jaxsft | {"FAKE_0": "hang", "FAKE_1": "hang"}
    launcher = subprocess.Popen([BASH, str(LAUNCH / "local_multi.sh"), "--log-dir", str(tmp_path / "logs"), str(CONFIG)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = Path(fake_jaxsft["FAKE_PIDS"])
    deadline = time.monotonic() + 20
    while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=20)
    assert launcher.returncode == 130 and "interrupted, stopping all processes" in err
    for i in (0, 1):
        with pytest.raises(ProcessLookupError):
            os.kill(int((pids / str(i)).read_text()), 0)


# --------------------------------------------------------------------------- tpu_vm.sh

def test_tpu_vm_dry_run(tmp_path):
    out = lines(launch("tpu_vm.sh", "--tpu", "my-tpu", "--zone", "us-east5-a", "--project", "proj", "--dry-run",
                       str(CONFIG), "train.steps=3", "a.b=x y", env={"TMPDIR": str(tmp_path)}))
    stage = tmp_path / "jaxsft-tpu-vm-my-tpu" / "jaxsft"
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone=us-east5-a", "--project=proj"]
    install = ('cd ~/jaxsft && { test -x .venv/bin/python || "$(command -v python3.12 || command -v python3.11 '
               '|| echo python3)" -m venv .venv; } && .venv/bin/python -m pip install -q -e ".[tpu]"')
    train = ("cd ~/jaxsft && mkdir -p launch-logs && set -o pipefail && .venv/bin/python -m jaxsft.cli train "
             "launch-config.yaml train.steps=3 'a.b=x y' 2>&1 | tee launch-logs/train.log")
    logs = ROOT / "launch-logs" / "my-tpu"
    assert out == [
        f"# stage {ROOT} (without .venv .git runs launch-logs) and {CONFIG} as launch-config.yaml in {stage}",
        shlex.join([*gcloud, "scp", str(stage), "my-tpu:", *where, "--worker=all", "--recurse"]),
        shlex.join([*gcloud, "ssh", "my-tpu", *where, "--worker=all", f"--command={install}"]),
        shlex.join([*gcloud, "ssh", "my-tpu", *where, "--worker=all", f"--command={train}"]),
        shlex.join([*gcloud, "describe", "my-tpu", *where, "--format=value(networkEndpoints.len())"]),
        "# then, for each worker W:",
        shlex.join([*gcloud, "scp", "my-tpu:jaxsft/launch-logs/train.log", f"{logs}/worker-W.log", *where,
                    "--worker=W"]),
    ]
    assert not stage.exists()  # a dry run stages nothing


FAKE_GCLOUD = """#!/usr/bin/env bash
# Stands in for gcloud: records each call; `tpu-vm scp` of the staged code lists what it would copy.
echo "$*" >> "$FAKE_DIR/calls"
case "$4" in
  scp) if [[ -d "$5" ]]; then (cd "$5" && ls -A) > "$FAKE_DIR/staged"; else echo "log of ${*: -1}" > "$6"; fi ;;
  ssh) echo "ran: ${*: -1}" ;;
  describe) echo 2 ;;
esac
"""


def test_tpu_vm_runs_gcloud_and_fetches_each_workers_log(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "gcloud").write_text(FAKE_GCLOUD)
    (fake_bin / "gcloud").chmod(0o755)
    logs = tmp_path / "logs"
    result = launch("tpu_vm.sh", "--tpu", "t", "--zone", "z", "--log-dir", str(logs), str(CONFIG), "train.steps=3",
                    env={"PATH": f"{fake_bin}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
                         "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split()[3] for c in calls] == ["scp", "ssh", "ssh", "describe", "scp", "scp"]
    staged = (tmp_path / "staged").read_text().split()
    assert {"jaxsft", "configs", "pyproject.toml", "launch-config.yaml"} <= set(staged)
    assert not {".venv", ".git", "runs", "launch-logs"} & set(staged)
    assert not (tmp_path / "jaxsft-tpu-vm-t").exists()  # the stage is removed
    assert "ran: --command=cd ~/jaxsft" in (logs / "train.log").read_text()
    for w in (0, 1):
        assert (logs / f"worker-{w}.log").read_text() == f"log of --worker={w}\n"


def test_tpu_vm_skip_install_and_required_options():
    out = lines(launch("tpu_vm.sh", "--tpu", "t", "--zone", "z", "--skip-install", "--dry-run", str(CONFIG)))
    assert not any("pip install" in line for line in out) and any("jaxsft.cli train" in line for line in out)
    result = launch("tpu_vm.sh", "--zone", "z", str(CONFIG))
    assert result.returncode == 2 and "missing --tpu NAME" in result.stderr


# --------------------------------------------------------------------------- gke_jobset.sh

def manifest(*args: str) -> dict:
    return yaml.safe_load(launch("gke_jobset.sh", "--image", "us-docker.pkg.dev/p/r/jaxsft:1",
                                 "--config", "configs/x.yaml", *args).stdout)


@pytest.mark.parametrize("tpu_type, accelerator, topology, hosts, chips_per_host", [
    ("v5p-16", "tpu-v5p-slice", "2x2x2", 2, 4),  # 16 TensorCores = 8 chips
    ("v5p-8", "tpu-v5p-slice", "2x2x1", 1, 4),
    ("v4-32", "tpu-v4-podslice", "2x2x4", 4, 4),
    ("v5e-16", "tpu-v5-lite-podslice", "4x4", 4, 4),
    ("v5litepod-8", "tpu-v5-lite-podslice", "2x4", 1, 8),
    ("v6e-8", "tpu-v6e-slice", "2x4", 1, 8),
    ("v6e-64", "tpu-v6e-slice", "8x8", 16, 4),
])
def test_gke_jobset_manifest(tpu_type, accelerator, topology, hosts, chips_per_host):
    # The topologies are those of jaxsft.aot.parse_topology (jaxsft compile --topology).
    m = manifest("--tpu-type", tpu_type, "--name", "sft-1", "train.steps=3", 'a.b="q" x')
    assert m["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and m["kind"] == "JobSet"
    assert m["metadata"]["name"] == "sft-1"
    (job,) = m["spec"]["replicatedJobs"]
    assert job["replicas"] == 1  # one slice
    spec = job["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == hosts and spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": accelerator,
                                   "cloud.google.com/gke-tpu-topology": topology}
    (container,) = pod["containers"]
    assert container["image"] == "us-docker.pkg.dev/p/r/jaxsft:1"
    assert container["command"] == ["python", "-m", "jaxsft.cli", "train", "configs/x.yaml", "train.steps=3",
                                    'a.b="q" x']
    assert container["resources"]["limits"] == {"google.com/tpu": chips_per_host}
    assert "env" not in container  # JAX finds the other hosts itself


def test_gke_jobset_usage_errors():
    for args, message in [(["--tpu-type", "v5p-16"], "missing --image"),
                          (["--image", "i", "--tpu-type", "v9-8"], "known generations"),
                          (["--image", "i", "--tpu-type", "v5p-12"], "6 chips is not a power of two"),
                          (["--image", "i", "--tpu-type", "v5p-16", "--name", "Bad_Name"], "--name Bad_Name")]:
        result = launch("gke_jobset.sh", "--config", "c.yaml", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_gke_jobset_apply(tmp_path):
    args = ["--image", "i", "--tpu-type", "v5p-16", "--config", "c.yaml"]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    kubectl = fake_bin / "kubectl"
    kubectl.write_text(f'#!/usr/bin/env bash\necho "$*" > {tmp_path}/args\ncat > {tmp_path}/stdin\n')
    kubectl.chmod(0o755)
    path = {"PATH": f"{fake_bin}:{os.environ['PATH']}"}
    printed = launch("gke_jobset.sh", *args, "--apply", "--dry-run", env=path)
    assert printed.returncode == 0 and yaml.safe_load(printed.stdout)["kind"] == "JobSet"
    assert not (tmp_path / "args").exists()  # --dry-run wins over --apply
    assert launch("gke_jobset.sh", *args, "--apply", env=path).returncode == 0
    assert (tmp_path / "args").read_text() == "apply -f -\n"
    assert (tmp_path / "stdin").read_text() == printed.stdout
    # Without kubectl: a clear error, nothing printed.
    result = launch("gke_jobset.sh", *args, "--apply", env={"PATH": str(tmp_path / "empty")})
    assert result.returncode == 1 and "--apply needs kubectl" in result.stderr and result.stdout == ""


# --------------------------------------------------------------------------- slurm.sbatch

def test_slurm_sbatch_headers():
    text = (LAUNCH / "slurm.sbatch").read_text().splitlines()
    first_command = next(i for i, line in enumerate(text) if line.strip() and not line.startswith("#"))
    sbatch = [i for i, line in enumerate(text) if line.startswith("#SBATCH")]
    assert sbatch and max(sbatch) < first_command  # sbatch reads no #SBATCH line after a command
    headers = dict(text[i][len("#SBATCH --"):].partition("=")[::2] for i in sbatch)
    assert headers["ntasks-per-node"] == headers["gpus-per-node"]  # one process per GPU
    assert int(headers["nodes"]) > 1


@pytest.mark.parametrize("how", ["env", "flag"])
def test_slurm_dry_run(how, tmp_path):
    args, env = (["--dry-run"], {}) if how == "flag" else ([], {"DRY_RUN": "1"})
    out = lines(launch("slurm.sbatch", *args, os.path.relpath(CONFIG, tmp_path), "train.steps=3", "a.b=x y",
                       cwd=tmp_path, env=env))
    assert out == [CD + shlex.join(["srun", "--kill-on-bad-exit=1", JAXSFT, "train", "configs/demo.yaml",
                                    "train.steps=3", "a.b=x y"])]
