"""A test simulator whose answer lines have an exact size: ``sized_answer.py SIZE``.

Each answer is ``{"id": ..., "loss": sum(x**2)}`` padded with spaces (valid JSON whitespace) to
exactly SIZE bytes, not counting the newline. ``sized_answer.py endless`` starts an answer line
and never ends it (it writes spaces until it is killed).
"""

import json
import sys

size = sys.argv[1]
out = sys.stdout.buffer
for line in sys.stdin:
    req = json.loads(line)
    answer = json.dumps({"id": req["id"], "loss": sum(v * v for v in req["x"])}).encode()
    if size == "endless":
        out.write(answer)
        block = b" " * 65536
        while True:
            out.write(block)
            out.flush()
    out.write(answer.ljust(int(size), b" ") + b"\n")
    out.flush()
