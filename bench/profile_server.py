#!/usr/bin/env python3
"""Run ``chatserver`` under a small sampling profiler (SIGPROF, CPU time).

Every ``--interval`` of CPU time spent by the process, the main thread's
Python stack is recorded. At exit (SIGINT, as for the server) it prints the
functions with the most samples, by self and by inclusive count, and can
write folded stacks (``--folded FILE``, one ``a;b;c N`` line per stack, the
format flame-graph tools read). Samples taken while the main thread waits in
the event loop's poll show up as the loop's own frame.

    HOST=127.0.0.1 PORT=8080 CHAT_DATABASE_URL=... \\
        .venv/bin/python bench/profile_server.py --folded /tmp/stacks.txt

``--window-signals``: sample only between a SIGUSR1 (start afresh) and a
SIGUSR2 (stop), e.g. ``bench/rooms.js --mark-window 1`` around its measured
phase, so that logins and set-up stay out of the profile.

Measure with it, never benchmark with it: sampling costs a little CPU. Read
it as a rough guide: Python runs signal handlers between bytecodes, so a
sample taken during a long C call (a syscall, a database step, another
thread holding the GIL) lands on the Python frame that runs next, and ticks
that expire together are counted once.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
from types import FrameType

_stacks: collections.Counter[tuple[str, ...]] = collections.Counter()


def _label(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename
    for marker in ("site-packages/", "lib/python3", "/chatserver/"):
        i = path.rfind(marker)
        if i != -1:
            path = path[i + len(marker) :] if marker != "/chatserver/" else "chatserver/" + path[i + len(marker) :]
            break
    return f"{path}:{code.co_name}"


def _sample(_signum: int, frame: FrameType | None) -> None:
    stack = []
    while frame is not None:
        stack.append(_label(frame))
        frame = frame.f_back
    _stacks[tuple(reversed(stack))] += 1


def report(top: int, folded: str | None) -> None:
    total = sum(_stacks.values())
    if not total:
        print("profile: no samples", file=sys.stderr)
        return
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for stack, n in _stacks.items():
        own[stack[-1]] += n
        for name in set(stack):
            incl[name] += n
    out = sys.stderr
    print(f"\nprofile: {total} samples", file=out)
    print("\nself:", file=out)
    for name, n in own.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {name}", file=out)
    print("\ninclusive:", file=out)
    for name, n in incl.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {name}", file=out)
    if folded:
        with open(folded, "w") as f:
            for stack, n in _stacks.most_common():
                f.write(";".join(stack) + f" {n}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.001, help="seconds of CPU time between samples")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--folded", help="write folded stacks here")
    parser.add_argument("--window-signals", action="store_true",
                        help="sample only from a SIGUSR1 (clears what was sampled) to a SIGUSR2")
    args, rest = parser.parse_known_args()
    sys.path.insert(0, os.environ.get("PYTHONPATH", "") or os.getcwd())
    from chatserver.__main__ import main as serve

    def start(_signum: int = 0, _frame: FrameType | None = None) -> None:
        _stacks.clear()
        signal.setitimer(signal.ITIMER_PROF, args.interval, args.interval)

    def stop(_signum: int = 0, _frame: FrameType | None = None) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)

    signal.signal(signal.SIGPROF, _sample)
    if args.window_signals:
        signal.signal(signal.SIGUSR1, start)
        signal.signal(signal.SIGUSR2, stop)
    else:
        start()
    try:
        return serve(rest)
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        report(args.top, args.folded)


if __name__ == "__main__":
    sys.exit(main())
