"""This process's memory as Linux reports it, for the benchmarks: `/proc/self/status` fields (VmHWM is the peak
RSS, the figure the benchmarks quote) and `/proc/meminfo` (what the machine has free). Values in MiB."""


def status_mib(field="VmHWM"):
    """A `/proc/self/status` field (VmHWM, VmRSS, ...) in MiB; NaN where there is none (not Linux)."""
    return _kib_field("/proc/self/status", field, float("nan")) / 1024


def available_mib():
    """MemAvailable of the machine in MiB (infinite where unknown: nothing is then skipped for lack of memory)."""
    return _kib_field("/proc/meminfo", "MemAvailable", float("inf")) / 1024


def _kib_field(path, field, missing):
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return missing
