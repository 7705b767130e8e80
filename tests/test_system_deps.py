"""scripts/system_deps.sh, run by `make test`: installs Chromium when it can, else stops with one clear line."""

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "system_deps.sh"


def run_script(tmp_path, chromium: str, *, uid: int, sudo_works: bool | None):
    """Run the script as if user `uid`, with a fake `sudo` (None: no sudo at all) and nothing else on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fakes = {"id": f"echo {uid}"}
    if sudo_works is not None:
        fakes["sudo"] = "exit 0" if sudo_works else "exit 1"
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": str(bin_dir), "SPARSEVL_CHROMIUM": chromium}
    return subprocess.run(["/bin/bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


def test_nothing_happens_when_chromium_is_present(tmp_path):
    result = run_script(tmp_path, "/bin/sh", uid=1000, sudo_works=None)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_without_root_or_sudo_it_stops_with_one_line_naming_the_package_and_the_command(tmp_path):
    for sudo_works in (None, False):  # no sudo, or sudo that asks for a password
        result = run_script(tmp_path, str(tmp_path / "missing-chromium"), uid=1000, sudo_works=sudo_works)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "missing Debian package chromium" in lines[0]
        assert "sudo apt-get install -y chromium" in lines[0]
        assert result.stdout == ""


def test_make_test_runs_the_script_before_pytest():
    makefile = (SCRIPT.parents[1] / "Makefile").read_text()
    test_rule = next(line for line in makefile.splitlines() if line.startswith("test:"))
    assert test_rule.split(":")[1].split() == ["system-deps", "$(STAMP)"]
    assert "scripts/system_deps.sh" in makefile
    assert "make test" in (SCRIPT.parents[1] / ".ci" / "run").read_text()
