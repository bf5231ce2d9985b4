"""Sleep until killed (tests/test_warm.py)."""

import time

while True:
    time.sleep(1)
