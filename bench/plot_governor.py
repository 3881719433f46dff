"""Plot a governed `generate --prompts` run: GPU power and temperature over time (nvidia-smi, 200 ms) with the batch
size and pause the governor chose (the run's index.jsonl "reading"/"governor" events) and the power limit.

usage: python bench/plot_governor.py SMI.csv INDEX.jsonl LIMIT_W OUT.png   (needs matplotlib: pip install matplotlib)
SMI.csv: `nvidia-smi --query-gpu=timestamp,power.draw,temperature.gpu,utilization.gpu --format=csv,noheader,nounits
-lms 200`, as bench/gpu_round12.sh records it beside the run.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def smi_series(path: str) -> tuple[list[datetime], list[float], list[float]]:
    times, power, temp = [], [], []
    for line in open(path, encoding="utf-8"):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 3:
            continue
        times.append(datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=timezone.utc))
        power.append(float(fields[1]))
        temp.append(float(fields[2]))
    return times, power, temp


def index_events(path: str) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    images = [line for line in lines if "file" in line]
    readings = [line for line in lines if line.get("event") == "reading"]
    return images, readings


def main() -> None:
    smi_csv, index_path, limit_w, out_png = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    times, power, temp = smi_series(smi_csv)
    images, readings = index_events(index_path)
    start = datetime.fromisoformat(readings[0]["time"]) if readings else times[0]
    t_smi = [(t - start).total_seconds() for t in times]
    t_read = [(datetime.fromisoformat(r["time"]) - start).total_seconds() for r in readings]
    fig, (ax_p, ax_b) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    ax_p.plot(t_smi, power, lw=0.7, color="tab:blue", label="power (nvidia-smi, 200 ms)")
    ax_p.step(t_read, [r["power_w"] for r in readings], where="pre", color="navy", lw=1.5,
              label="power per micro-batch window (governor's reading)")
    ax_p.axhline(limit_w, color="red", ls="--", lw=1, label=f"--max-power {limit_w:g}")
    ax_p.set_ylabel("W")
    ax_t = ax_p.twinx()
    ax_t.plot(t_smi, temp, color="tab:orange", lw=1, label="temperature")
    ax_t.set_ylabel("°C")
    ax_t.set_ylim(min(temp) - 5, max(temp) + 15)
    handles = ax_p.get_legend_handles_labels()[0] + ax_t.get_legend_handles_labels()[0]
    ax_p.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8)
    ax_p.set_title(f"generate --prompts, --max-power {limit_w:g}: {len(images)} images; mean power over the run "
                   "in docs/BENCHMARKS.md", fontsize=10)
    ax_b.step(t_read, [r["batch"] for r in readings], where="pre", color="green", label="batch size")
    ax_b.step(t_read, [r["pause_s"] for r in readings], where="pre", color="purple", label="pause between batches, s")
    ax_b.set_xlabel("seconds since the first micro-batch finished (each reading covers the window before it)")
    ax_b.legend(loc="upper right", fontsize=8)
    lo = min(t_read) - 40 if t_read else 0
    ax_b.set_xlim(lo, max(t_smi))
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print(out_png)


if __name__ == "__main__":
    main()
