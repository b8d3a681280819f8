"""A two-rank 'collective' over a FIFO (argv[1]) for the victim-aware root cause test.

Rank 1 stops (exits 3) once rank 0 is connected. Rank 0 then sees the end of
the FIFO, as gloo sees its peer go away, and fails saying it timed out waiting
for a send; its error file is dated 5 s *earlier* than rank 1's exit, so only
the victim rule (not the timestamps) can name rank 1 the root cause.
"""

from __future__ import annotations

import json
import os
import sys
import time

fifo = sys.argv[1]
if os.environ["RANK"] == "1":
    with open(fifo, "rb"):  # returns once rank 0 has opened the other end
        pass
    sys.exit(3)
with open(fifo, "wb") as peer:
    try:
        while True:  # rank 1 reads nothing: the write fails once it is gone
            peer.write(b"x" * 65536)
            peer.flush()
    except BrokenPipeError:
        pass
message = "RuntimeError: [gloo] Timed out waiting 15000ms for send operation to complete"
record = {
    "message": message,
    "type": "builtins.RuntimeError",
    "traceback": f"Traceback (most recent call last):\n  ...\n{message}\n",
    "timestamp": time.time() - 5,
}
with open(os.environ["CORRAL_ERROR_FILE"], "w") as f:
    json.dump(record, f)
sys.exit(1)
