import subprocess
import sys


def test_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "fluidlm", "--help"], capture_output=True, text=True, check=True)
    for command in ("info", "data", "train", "eval", "checkpoint", "launch", "export", "generate"):
        assert command in out.stdout


def test_info_reports_backends():
    out = subprocess.run([sys.executable, "-m", "fluidlm", "info", "--json"], capture_output=True, text=True, check=True)
    assert '"chunked"' in out.stdout
