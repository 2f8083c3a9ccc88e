"""A minimal taskgate task: reads its JSON payload from stdin and greets.

Run by the worker as `python3 -m examples.hello` (the default module runner) with the
payload on stdin (`--payload-mode stdin`, the default). It sees only the executor's
allow-listed environment: TASK_ID, TASK_ATTEMPT, TASK_MODULE, TASK_QUEUE, PATH, LANG
and the names the operator passed with --env-allow.

Exit status 0 is success; anything else is a failure whose stderr tail becomes the
task's last error.
"""

import json
import os
import sys


def main() -> int:
    raw = sys.stdin.read()
    try:
        payload = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as err:
        # Say where the payload is broken, never what it contains.
        print(f"payload is not JSON: line {err.lineno} column {err.colno}", file=sys.stderr)
        return 2
    if not isinstance(payload, dict):
        print("payload must be a JSON object", file=sys.stderr)
        return 2
    name = payload.get("name", "world")
    if not isinstance(name, str) or len(name) > 100:
        print("payload field 'name' must be a string of at most 100 characters", file=sys.stderr)
        return 2
    task = os.environ.get("TASK_ID", "?")
    attempt = os.environ.get("TASK_ATTEMPT", "?")
    print(f"hello, {name} (task {task}, attempt {attempt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
