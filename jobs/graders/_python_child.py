"""The child process of a python grader: loads grade() once, then scores JSON lines from stdin.

Run by file path with the standard library only, so it imports none of the trainer's code. Protocol:
the first stdin line is the setup ({source | function, paths}); the child answers {"ready": true} or
{"setup_error": ...}, then one {"score": x} or {"error": ...} line per {"sample", "item"} line.
"""

import importlib
import json
import math
import os
import resource
import sys


def describe(error):
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text[:300]


def load(setup):
    if setup.get("source") is not None:
        namespace = {"__name__": "grader_source"}
        exec(compile(setup["source"], "<grader source>", "exec"), namespace)
        return namespace["grade"]
    module, _, function = setup["function"].partition(":")
    return getattr(importlib.import_module(module), function)


def score(grade, request):
    try:
        value = grade(request["sample"], request["item"])
    except BaseException as e:  # the user's SystemExit or MemoryError is that sample's error too
        return {"error": describe(e)}
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return {"error": f"grade returned {type(value).__name__}, not a number"}
    if not math.isfinite(value):
        return {"error": f"grade returned {value}, not a finite number"}
    return {"score": float(value)}


def main():
    limit = int(sys.argv[1]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # The protocol owns the real stdout; the user's print() goes to stderr (a log file).
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    del sys.path[0]  # this script's directory: user code must not import the graders' modules

    setup = json.loads(sys.stdin.readline())
    sys.path[:0] = setup["paths"]
    try:
        grade = load(setup)
    except BaseException as e:
        replies.write(json.dumps({"setup_error": describe(e)}) + "\n")
        return
    replies.write('{"ready": true}\n')
    for line in sys.stdin:
        replies.write(json.dumps(score(grade, json.loads(line))) + "\n")


if __name__ == "__main__":
    main()
