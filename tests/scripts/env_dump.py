"""Print what a launched process sees (its environment, arguments, working directory, session) as
one JSON line: for comparing warm forks with real launches (tests/test_warm.py)."""

import json
import os
import sys

# the launcher's variables only: a short line, written whole even when two processes share the stream
KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
env = {k: v for k, v in os.environ.items() if k.startswith(("ACCELERATE_", "KMP_")) or k in KEYS}
print(json.dumps({"env": env, "argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(),
                  "session_leader": os.getsid(0) == os.getpid(), "path0": sys.path[0]}))  # fmt: skip
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
