"""One rank fails once the others are up; the others finish, hang or ignore SIGTERM.

usage: launch_fail.py PID_DIR FAIL_RANK EXIT_CODE (finish|hang|ignore-term)
Each rank writes `<pid> [<child pid>]` to PID_DIR/rank<i>; hanging ranks also start a
child process that sleeps, to check that the launcher stops whole process groups.
"""

import os
import signal
import subprocess
import sys
import time

pid_dir, fail_rank, exit_code, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rank = int(os.environ["JAX_EP_PROCESS_ID"])
nproc = int(os.environ["JAX_EP_NUM_PROCESSES"])

pids = [os.getpid()]
if rank != fail_rank and mode != "finish":
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids.append(subprocess.Popen(["sleep", "300"]).pid)
with open(os.path.join(pid_dir, f"rank{rank}.tmp"), "w") as f:
    f.write(" ".join(map(str, pids)))
os.rename(os.path.join(pid_dir, f"rank{rank}.tmp"), os.path.join(pid_dir, f"rank{rank}"))
print(f"up ({mode})")

if rank == fail_rank:
    deadline = time.monotonic() + 30
    while len([n for n in os.listdir(pid_dir) if not n.endswith(".tmp")]) < nproc:
        if time.monotonic() > deadline:
            sys.exit("the other ranks never came up")
        time.sleep(0.05)
    print("failing now", file=sys.stderr)
    sys.exit(exit_code)
if mode != "finish":
    time.sleep(300)
