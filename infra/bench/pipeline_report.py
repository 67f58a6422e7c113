"""Tables, targets and the latency plot of `edgeq bench pipeline` (docs/results/pipeline.md)."""

from __future__ import annotations

import math
from pathlib import Path

from infra.bench.pipeline_runs import MODES, SATURATION, ModeResult, PipelineBenchConfig, load_name
from infra.bench.report import Table, machine_info, write_markdown

PLOT = "pipeline_latency.png"
# The targets on a 2-core machine, as ratios from the same run.
TARGET_THROUGHPUT = 0.5      # edgeq frames/s >= this x the ceiling's
TARGET_P99_MS = 50.0         # p99 at 50 % of edgeq's saturation rate
TARGET_UPLINK_RATIO = 20.0   # cloud-only edge->cloud bytes/frame >= this x edgeq's
TARGET_ACCURACY_POINTS = 0.5  # edgeq accuracy >= cloud-only's minus this many points


def _f(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def per_frame(n_bytes: int, frames: int) -> float | None:
    return n_bytes / frames if frames else None


def cost_phase(cfg: PipelineBenchConfig) -> str:
    """The load whose CPU per frame the table reports: 50 % if measured, else the middle load."""
    loads = sorted(cfg.loads)
    return load_name(0.5 if 0.5 in loads else loads[len(loads) // 2])


def summary_rows(modes: dict[str, ModeResult], cfg: PipelineBenchConfig) -> dict[str, dict]:
    """Per mode, the figures the tables print (numbers, not strings), for the tables and the tests."""
    ceiling = modes["ceiling"]
    base_rate = ceiling.saturation
    cost = cost_phase(cfg)
    rows = {}
    for mode in MODES:
        m = modes[mode]
        mid = m.phase(cost)
        answered = m.total("answered")
        rows[mode] = {
            "rate": m.saturation, "rate_x": m.saturation / base_rate if base_rate else None,
            "cpu_per_1k": 1000 * mid.cpu_s / mid.answered if mid is not None and mid.answered else None,
            "rss_mib": m.peak_rss / 2**20,
            "device_bpf": per_frame(m.total("device_bytes"), m.total("sent")),
            "uplink_bpf": None if mode == "ceiling" else per_frame(m.total("uplink_bytes"), answered),
            "result_bpf": None if mode == "ceiling" else per_frame(m.total("result_bytes"), answered),
            "accuracy": m.accuracy, "answered": answered, "sent": m.total("sent"), "dropped": m.total("dropped"),
            "edge_share": None if mode == "ceiling" or not answered
            else sum(p.tiers["edge"] for p in m.probes + m.phases) / answered,
        }
    base_cpu = rows["ceiling"]["cpu_per_1k"]
    for r in rows.values():
        r["cpu_x"] = r["cpu_per_1k"] / base_cpu if r["cpu_per_1k"] is not None and base_cpu else None
    return rows


def targets(modes: dict[str, ModeResult], cfg: PipelineBenchConfig) -> list[tuple[str, str, str, bool | None]]:
    """(target, required, measured, met) for the issue's three targets."""
    rows = summary_rows(modes, cfg)
    e, c = rows["edgeq"], rows["cloud-only"]
    out = []
    x = e["rate_x"]
    out.append((f"edgeq frames/s vs ceiling (QoS {cfg.qos})", f">= {TARGET_THROUGHPUT:.2f}x", _f(x, 2) + "x",
                None if x is None else x >= TARGET_THROUGHPUT))
    half = load_name(0.5)
    p99 = modes["edgeq"].phase(half).pct(99) if modes["edgeq"].phase(half) is not None else float("nan")
    out.append((f"edgeq p99 at {half} of its saturation rate", f"<= {TARGET_P99_MS:.0f} ms", f"{_f(p99)} ms",
                None if math.isnan(p99) else p99 <= TARGET_P99_MS))
    ratio = c["uplink_bpf"] / e["uplink_bpf"] if e["uplink_bpf"] and c["uplink_bpf"] else None
    out.append(("edge->cloud bytes/frame, cloud-only / edgeq", f">= {TARGET_UPLINK_RATIO:.0f}x", _f(ratio) + "x",
                None if ratio is None else ratio >= TARGET_UPLINK_RATIO))
    da = None if e["accuracy"] is None or c["accuracy"] is None else 100 * (e["accuracy"] - c["accuracy"])
    out.append(("accuracy, edgeq - cloud-only", f">= -{TARGET_ACCURACY_POINTS} points", f"{_f(da, 2)} points",
                None if da is None else da >= -TARGET_ACCURACY_POINTS))
    return out


def tables(modes: dict[str, ModeResult], cfg: PipelineBenchConfig) -> list[Table]:
    rows = summary_rows(modes, cfg)
    cost = cost_phase(cfg)
    main = Table("Throughput and cost, ratios to the ceiling from the same run",
                 ["mode", "sustained frames/s", "x ceiling", f"CPU s / 1k frames ({cost})", "x ceiling",
                  "peak RSS MiB", "B/frame device->edge", "B/frame edge->cloud", "B/frame results",
                  "accuracy", "answered at edge"],
                 note=f"Sustained frames/s: frames captured and answered (ceiling: received) per second in the "
                      f"probe of the saturation search that carried the most while answers kept up "
                      f"(>= {cfg.sustain:.0%} of the "
                      f"frames captured, p99 <= {cfg.max_p99_ms:g} ms). CPU and memory: broker, Ray, edge and cloud "
                      "actors (ceiling: broker and subscribers), not the publishers or the results consumer. Bytes "
                      "and accuracy: every phase of the mode.")
    for mode in MODES:
        r = rows[mode]
        limit = " (devices' limit)" if modes[mode].publisher_limited else ""
        main.add(mode, _f(r["rate"]) + limit, _f(r["rate_x"], 2) + "x" if r["rate_x"] is not None else "n/a",
                 _f(r["cpu_per_1k"], 2), _f(r["cpu_x"], 2) + "x" if r["cpu_x"] is not None else "n/a",
                 _f(r["rss_mib"], 0), _f(r["device_bpf"]), _f(r["uplink_bpf"]), _f(r["result_bpf"]),
                 "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f} %",
                 "n/a" if r["edge_share"] is None else f"{100 * r['edge_share']:.1f} %")
    lat = Table("Latency at fixed offered loads (fractions of edgeq's saturation rate)",
                ["mode", "load", "offered frames/s", "captured frames/s", "answered frames/s", "answered / sent",
                 "dropped", "p50 ms", "p99 ms", "p99.9 ms"],
                note="Latency: capture time on the device to the result published by the worker that answered "
                     "(ceiling: to the frame's arrival at the subscriber), for frames captured after the warmup.")
    for mode in MODES:
        m = modes[mode]
        for p in ([m.best] if m.best else []) + m.phases:
            lat.add(mode, SATURATION if p is m.best else p.name, _f(p.offered, 0), _f(p.captured_rate, 0),
                    _f(p.rate, 0), f"{p.answered} / {p.sent}", p.dropped, _f(p.pct(50)), _f(p.pct(99)),
                    _f(p.pct(99.9)))
    tgt = Table("The issue's targets (2-core machine, same run)", ["target", "required", "measured", "met"])
    for name, req, got, met in targets(modes, cfg):
        tgt.add(name, req, got, "n/a" if met is None else ("yes" if met else "NO"))
    return [main, lat, tgt]


def plot(path: Path, modes: dict[str, ModeResult]) -> Path:
    """p50 and p99 latency against offered load, one colour per mode, log latency axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, colour in zip(MODES, ("tab:grey", "tab:blue", "tab:red"), strict=True):
        pts = sorted((p for p in modes[mode].probes + modes[mode].phases if len(p.latency_ms)),
                     key=lambda p: p.offered)
        x = [p.offered for p in pts]
        ax.plot(x, [p.pct(99) for p in pts], "-o", color=colour, label=f"{mode} p99")
        ax.plot(x, [p.pct(50) for p in pts], "--s", color=colour, label=f"{mode} p50", alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("offered load (frames/s)")
    ax.set_ylabel("capture -> result latency (ms)")
    ax.axhline(TARGET_P99_MS, color="k", lw=0.5, ls=":")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(out_dir: Path, modes: dict[str, ModeResult], cfg: PipelineBenchConfig, tbls: list[Table],
          command: str, elapsed_s: float, load: tuple[float, float] | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(out_dir / PLOT, modes)
    notes = [
        f"{cfg.devices} simulated devices (publishers.device.Device, one paho client each) in {cfg.publishers} "
        f"publisher processes, so one Python process is not the limit of the offered load; noise {cfg.noise}; "
        f"MNIST test split replayed.",
        f"Saturation search per mode: probes of {cfg.probe_s:g} s from {cfg.start_rate:g} frames/s, doubling "
        f"until one is not sustained, then {cfg.bisect} geometric bisection probe(s); the `saturation` row is the "
        f"sustained probe with the highest throughput. Then {', '.join(load_name(f) for f in cfg.loads)} "
        f"of edgeq's sustained rate "
        f"for {cfg.duration_s:g} s each. The first {cfg.warmup_s:g} s of each phase are left out of rates and "
        "latencies. edgeq runs first (its rate sets the loads), then cloud-only, then the ceiling after Ray is "
        "shut down. The plot has every probe and load phase.",
        *(f"{m}: {modes[m].detail}" for m in MODES),
        "Bytes per frame are payload bytes (MQTT framing not counted): device->edge wire frames, edge->cloud "
        "uplink codec payloads over all answered frames, results the JSON result messages.",
        "`(devices' limit)`: asked for twice the rate, the devices generated no more frames (the publishers "
        "and the broker had the CPU), so this is the most these publishers can offer here, not a limit of the "
        "subscribers.",
        "Every phase waits until each frame the broker acknowledged is answered or counted as dropped "
        "(column `dropped`) before the next one starts.",
        f"The whole run took {elapsed_s:.0f} s.",
    ]
    if load is not None:
        notes.append(f"1-minute load average {load[0]:.1f} at the start and {load[1]:.1f} at the end of the run "
                     f"on {machine_info()['cores usable / online']} cores: above the core count, other work on "
                     "the host took CPU from every mode (ratios are from the same run; absolute figures move).")
    return write_markdown(out_dir / "pipeline.md", "Pipeline throughput and latency: edgeq, cloud-only, ceiling",
                          tbls, machine_info(), command, notes=notes, images=[("latency vs offered load", PLOT)],
                          intro="One run on one machine: the same devices, broker and frames for the three modes "
                                "(`edgeq bench pipeline`).")
