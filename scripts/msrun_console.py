"""Run MindSpore's msrun with a console a user can read when a worker fails (used by msrun_launcher.sh).

msrun (`mindspore.parallel.cluster.run.main`) ends a failed job by raising "Distributed job exited with exception"
out of its process manager, so the launcher's console closes with a Python traceback into MindSpore's own code,
while the reason is in the worker logs. This runs msrun's `main` unchanged and turns exactly that ending into a
few lines: which worker logs hold an error, and the first `run_mindformer.py: error:` line of each (the one line
a user error ends a worker with), then exit status 1. Every other outcome, including any other exception, is
msrun's own.

    python scripts/msrun_console.py --worker_num=2 ... --log_dir=LOG_DIR --join=True script.py args...
"""
import glob
import os
import re
import sys

FAILED_JOB = "Distributed job exited with exception"
ERROR_PREFIX = "run_mindformer.py: error: "
PREFIX = "msrun_launcher.sh"


def log_dir_of(argv):
    """The --log_dir value msrun was given (its default: the current directory)."""
    for index, arg in enumerate(argv):
        if arg.startswith("--log_dir="):
            return arg.split("=", 1)[1]
        if arg == "--log_dir" and index + 1 < len(argv):
            return argv[index + 1]
    return "."


def _rank_of(path):
    match = re.search(r"worker_(\d+)\.log$", path)
    return int(match.group(1)) if match else -1


def failure_summary(log_dir):
    """Lines naming each worker log with an error line, its first such line; or where to look."""
    lines = []
    for path in sorted(glob.glob(os.path.join(log_dir, "worker_*.log")), key=_rank_of):
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            first = next((line.strip() for line in handle if line.startswith(ERROR_PREFIX)), None)
        if first:
            lines.append(f"{PREFIX}: {os.path.basename(path)}: {first}")
    if not lines:
        lines.append(f"{PREFIX}: no worker log under {log_dir} has a run_mindformer.py error line; read "
                     f"{os.path.join(log_dir, 'worker_<rank>.log')} and scheduler.log for the cause")
    return lines


def main(argv):
    from mindspore.parallel.cluster.run import main as msrun_main

    sys.argv = ["msrun"] + list(argv)
    try:
        msrun_main()
    except RuntimeError as error:
        if FAILED_JOB not in str(error):
            raise
        log_dir = log_dir_of(argv)
        print(f"{PREFIX}: error: a worker failed; the job was stopped (logs in {log_dir})", file=sys.stderr)
        for line in failure_summary(log_dir):
            print(line, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
