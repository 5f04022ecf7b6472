"""A test simulator speaking zoblackbox's JSON-lines protocol, with triggerable faults.

loss(x) = sum(x**2), except when x[0] is one of the trigger values below.
"""

import json
import sys
import time

for line in sys.stdin:
    req = json.loads(line)
    x, qid = req["x"], req["id"]
    trigger = x[0]
    if trigger == 100:  # hang
        time.sleep(60)
    if trigger == 101:  # crash mid-query
        print("quirky_sim: crashing on purpose", file=sys.stderr, flush=True)
        sys.exit(3)
    if trigger == 102:
        out = "this is not json"
    elif trigger == 103:
        out = json.dumps({"id": qid + 7, "loss": 1.0})
    elif trigger == 104:
        out = json.dumps({"id": qid, "loss": "abc"})
    elif trigger == 105:
        out = json.dumps({"id": qid, "error": "solver diverged"})
    elif trigger == 106:
        out = json.dumps({"id": qid, "loss": float("nan")})
    else:
        out = json.dumps({"id": qid, "loss": sum(v * v for v in x)})
    sys.stdout.write(out + "\n")
    sys.stdout.flush()
