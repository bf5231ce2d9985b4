"""The warm interpreter the tests fork their tool runs from (tests/warm.py) gives a run what a real
launch gives it: the launcher's environment, the arguments, the working directory, its exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tests.conftest import ROOT, launch, popen, tool_env

SCRIPT = "../tests/scripts/env_dump.py"
# what the tools read of a launched process's environment
READ = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")


def _seen(res: subprocess.CompletedProcess) -> list[dict]:
    assert res.returncode == 0, res.stderr[-3000:]
    return sorted((json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")),
                  key=lambda s: int(s["env"].get("RANK", 0)))  # fmt: skip


def test_a_warm_run_sees_what_accelerate_launch_gives_one_and_two_processes():
    for nproc in (1, 2):
        real, warm = (_seen(launch(SCRIPT, ["a b", "--flag=1"], nproc=nproc, warm=w)) for w in (False, True))
        assert len(real) == len(warm) == nproc, (real, warm)
        for r, w in zip(real, warm):
            assert w["argv"] == r["argv"] == ["a b", "--flag=1"] and w["cwd"] == r["cwd"]
            assert w["path0"] == r["path0"] == str(ROOT / "tests" / "scripts")
            keys = {k for k in r["env"] if k.startswith(("ACCELERATE_", "KMP_")) or k in READ}
            assert keys and keys == {k for k in w["env"] if k.startswith(("ACCELERATE_", "KMP_")) or k in READ}
            for k in keys - {"MASTER_PORT"}:  # each launch is given a port of its own
                assert w["env"][k] == r["env"][k], (nproc, k)
            assert w["pid"] != os.getpid()


def test_a_warm_run_is_a_process_of_its_own_with_its_exit_code_and_signals():
    cmd = [sys.executable, str(ROOT / "tests" / "scripts" / "env_dump.py")]
    proc = popen(cmd, env=tool_env({"EXIT_CODE": "3"}), start_new_session=True, stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    seen = json.loads(out)
    assert proc.returncode == 3 and seen["session_leader"] and seen["pid"] == proc.pid
    sleeper = ROOT / "tests" / "scripts" / "sleep_forever.py"
    proc = popen([sys.executable, str(sleeper)], env=tool_env(), start_new_session=True, stdout=subprocess.PIPE)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
