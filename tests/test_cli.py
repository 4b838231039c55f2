import subprocess
import sys

from typer.testing import CliRunner

from attnkit.cli import app

runner = CliRunner()


def test_list_and_info():
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0 and "sliding_window" in res.stdout
    res = runner.invoke(app, ["info", "linear"])
    assert res.exit_code == 0 and "feature_map" in res.stdout


def test_check_passes_and_unknown_method_exits_2():
    res = runner.invoke(app, ["check", "sliding_window", "--configs", "1"])
    assert res.exit_code == 0, res.stdout
    proc = subprocess.run([sys.executable, "-m", "attnkit.cli", "info", "slidingwindow"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "sliding_window" in proc.stdout
