"""The nightly GPU workflow (.github/workflows/nightly-gpu.yml) parses, its commands are the
README's, and every command, module and pytest option it names exists."""

import importlib.util
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "nightly-gpu.yml"


def _commands():
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    return [step["run"].strip() for job in jobs.values() for step in job["steps"] if "run" in step]


def test_workflow_parses_into_a_scheduled_gpu_job():
    flow = yaml.safe_load(WORKFLOW.read_text())
    triggers = flow[True] if True in flow else flow["on"]  # YAML 1.1 reads the key `on` as true
    assert "schedule" in triggers
    job = flow["jobs"]["suite"]
    assert "self-hosted" in job["runs-on"] and set(job["strategy"]["matrix"]["gpu"]) == {"b200", "gb10"}
    uploads = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert uploads and ".benchmarks/" in uploads[0]["with"]["path"] and "report/" in uploads[0]["with"]["path"]


def test_ci_runs_the_readmes_test_command_after_its_installs():
    # .ci/run: the README's tests line, its installs quiet and through python3 -m pip, then its test command
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    readme = next(line for line in (REPO / "README.md").read_text().splitlines()
                  if line.startswith("pip install torch=="))
    *installs, test = readme.split(" && ")
    assert ci == [i.replace("pip install", "python3 -m pip install --quiet") for i in installs] + [test]


@pytest.mark.parametrize("command", _commands())
def test_every_command_is_in_the_readme(command):
    assert command in (REPO / "README.md").read_text()


@pytest.mark.parametrize("command", _commands())
def test_every_command_exists(command):
    words = shlex.split(command)
    assert shutil.which(words[0]), f"{words[0]} is not on PATH"
    if words[:2] == ["python3", "-m"]:
        assert importlib.util.find_spec(words[2]) is not None, f"no module {words[2]}"
    if words[0] == "pytest":
        usage = subprocess.run([sys.executable, "-m", "pytest", "--help"], capture_output=True, text=True,
                               cwd=REPO).stdout
        for flag in (w.split("=")[0] for w in words[1:] if w.startswith("--")):
            assert flag in usage, f"pytest has no option {flag}"
