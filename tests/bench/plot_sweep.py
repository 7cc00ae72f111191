"""Plots tests/bench/sweep.sh's sweep.csv: CPU per delivery and p99 of the
hot room beside the floor probe's, and bytes per idle connection, against
the connection count.

    python plot_sweep.py sweep.csv sweep.png
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(rows, kind, field):
    points = [(int(r["connections"]), float(r[field])) for r in rows if r["kind"] == kind and r[field]]
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]


def main(src, dst):
    rows = list(csv.DictReader(open(src)))
    fig, (cpu, p99, mem) = plt.subplots(1, 3, figsize=(15, 4.5))
    for kind, style in (("hot", "o-"), ("floor", "s--")):
        label = "gateway" if kind == "hot" else "floor probe"
        cpu.plot(*series(rows, kind, "cpu_us_per_delivery"), style, label=label)
        p99.plot(*series(rows, kind, "p99_ms"), style, label=label)
    cpu.set(title="hot room: server CPU per delivery", xlabel="connections", ylabel="µs", ylim=(0, None))
    p99.set(title="hot room: p99 latency", xlabel="connections", ylabel="ms", ylim=(0, None))
    mem.plot(*series(rows, "idle", "bytes_per_connection"), "o-", label="gateway, idle (2 rooms each)")
    mem.axhline(4096, color="grey", linestyle=":", label="target: 4 KiB")
    mem.set(title="idle: RSS per connection", xlabel="connections", ylabel="bytes", ylim=(0, None))
    for ax in (cpu, p99, mem):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(dst, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
