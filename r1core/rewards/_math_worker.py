"""math-verify worker process: one JSON request per stdin line, one JSON reason per stdout line.

Started by `math_accuracy.py` as `python -I _math_worker.py MEMORY_MB` so that checks requested
from threads other than the main one still get math-verify's signal timeouts (they only work on a
main thread), and so that the parent can kill it when even those fail (C code that ignores signals).
Loads `mathcheck.py` by path: the isolated interpreter must not import r1core (and with it torch).
"""

import importlib.util
import json
import os
import resource
import sys


def _load_mathcheck():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mathcheck.py")
    spec = importlib.util.spec_from_file_location("_r1core_mathcheck", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    memory_mb = int(sys.argv[1])
    if memory_mb > 0:
        # A sympy blow-up must end in MemoryError here, not in the kernel's OOM killer elsewhere.
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    mathcheck = _load_mathcheck()
    mathcheck.check("1/2", "0.5", 5)  # warm the LaTeX parser before saying ready
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            reason = mathcheck.check(req["pred"], req["gold"], req["timeout_s"])
        except MemoryError:
            reason = "memory"
        out.write(json.dumps({"reason": reason}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
