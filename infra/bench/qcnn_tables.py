"""Tables of `edgeq bench qcnn`: targets, native vs onnxruntime ratios, size, latency, per-layer errors,
the wide-FC note."""

from __future__ import annotations

from infra.bench.report import Table


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _ratio_row(t: Table, what: str, num: float, den: float, goal: float) -> None:
    ratio = num / den
    t.add(what, f"{ratio:.2f}×", f"≥ {goal:g}×", "yes" if ratio >= goal else "no")


# Issue 16's speed goals, native net vs float onnxruntime: (model, batch, threads or None = all) -> minimum ratio.
SPEED_GOALS = {("edge CNN", 1, None): 2.0, ("edge CNN", 32, None): 1.2, ("cloud CNN", 1, 1): 3.0,
               ("cloud CNN", 32, 1): 1.5}
SIZE_GOALS = {"edge CNN": 20.0, "cloud CNN": 15.0}  # minimum compression, at most MAX_LOSS points lost
MAX_LOSS = 0.5


def _goal(t: Table, what: str, value: float, text: str, goal: float, goal_text: str) -> None:
    t.add(what, text, goal_text, "yes" if value >= goal else "no")


def targets_table(cases: list, threads: tuple[int, ...], native: str) -> Table:
    """Issue 16's goals from this run: speed ratios of medians (same run) and size / accuracy of the EC file."""
    t = Table("Q-CNN targets (this run)", ["what", "measured", "goal", "met"],
              note=f"Speed: float onnxruntime median / \"{native}\" median from the latency table below (same run, "
                   "same process, interleaved blocks). Size: float file bytes / Q-CNN EC file bytes, accuracy on the "
                   "held-out split. Agreement = share of held-out images where the native kernels (8-bit tables) and "
                   "the numba kernels (float tables) predict the same class for the same EC file.")
    by = {c.name: {v.name: v for v in c.variants} for c in cases}
    for (model, batch, th_goal), goal in SPEED_GOALS.items():
        if model not in by:
            continue
        for th in threads if th_goal is None else [th_goal]:
            v = by[model]
            ratio = v["float"].latency[batch, th].median_ms / v[native].latency[batch, th].median_ms
            _goal(t, f"{model}, batch {batch}, {th} thread(s): float / native", ratio, f"{ratio:.2f}×", goal,
                  f"≥ {goal:g}×")
    for c in (c for c in cases if c.name.startswith("wide FC")):  # issue 8's wide-layer goals, kept
        for th in threads:
            ms = {name: v.latency[1, th].median_ms for name, v in by[c.name].items()}
            _ratio_row(t, f"{c.name}, batch 1, {th} thread(s): float / native", ms["float"], ms[native], 10)
            _ratio_row(t, f"{c.name}, batch 1, {th} thread(s): int8 QDQ / native", ms["int8 QDQ"], ms[native], 3)
    for model, goal in SIZE_GOALS.items():
        if model not in by:
            continue
        v = by[model]
        ratio = v["float"].file_bytes / v["Q-CNN EC"].file_bytes
        loss = 100 * (v["float"].accuracy - v[native].accuracy)
        _goal(t, f"{model}: compression (EC file)", ratio, f"{ratio:.2f}×", goal, f"≥ {goal:g}×")
        _goal(t, f"{model}: accuracy lost (native; < 0 = gained)", -loss, f"{loss:.2f} points", -MAX_LOSS,
              f"≤ {MAX_LOSS} points")
        agree = float((v[native].top1 == v["Q-CNN EC"].top1).mean())
        _goal(t, f"{model}: native vs float-table predictions", agree, f"{100 * agree:.2f} %", 0.995, "≥ 99.5 %")
    return t


def ratio_table(cases: list, threads: tuple[int, ...], batches: tuple[int, ...], native: str) -> Table:
    """Per model, batch and thread count: the native net's median against float and int8 onnxruntime's."""
    t = Table("Q-CNN native vs onnxruntime (same run)",
              ["model", "batch", "threads", "native ms", "float ms", "int8 ms", "vs float ×", "vs int8 ×"],
              note="× = onnxruntime median / native median (> 1: the native net is faster); medians of the "
                   "interleaved blocks of the latency table.")
    for c in cases:
        v = {x.name: x for x in c.variants}
        for b in batches:
            for th in threads:
                n, f, i = (v[k].latency[b, th].median_ms for k in (native, "float", "int8 QDQ"))
                t.add(c.name, b, th, f"{n:.3f}", f"{f:.3f}", f"{i:.3f}", f"{f / n:.2f}", f"{i / n:.2f}")
    return t


def layer_table(cases: list) -> Table:
    t = Table("Per-layer response error (Q-CNN, k-means vs error correction)",
              ["model", "layer", "kind", "stored", "M", "K", "dsub", "float bytes", "stored bytes", "k-means", "EC"],
              note="response error = ||Y_q - Y||² / ||Y||² of the layer output on the calibration inputs, each "
                   "network fed its own quantized lower layers, as reported by the compressor (k-means column from "
                   "the k-means run, EC column from the EC run); layers kept standard have none.")
    for c in cases:
        by_name = {v.name: v.report for v in c.variants if v.report is not None}
        km = {row["name"]: row for row in by_name["Q-CNN k-means"].layers}
        for row in by_name["Q-CNN EC"].layers:
            err_km = km.get(row["name"], row).get("response_error_kmeans")
            t.add(c.name, row["name"], row["kind"], row.get("kind_stored", "pq"), _fmt(row["M"], "d"),
                  _fmt(row["K"], "d"), _fmt(row["dsub"], "d"), f"{row['float_bytes']:,}", f"{row['pq_bytes']:,}",
                  _fmt(err_km, ".4f"), _fmt(row.get("response_error_ec"), ".4f"))
    return t


def wide_note(case) -> str:
    """What the wide FC's Q-CNN rows show: the wide-layer settings used and whether EC held up out of sample."""
    by_name = {v.name: v for v in case.variants}
    km, ec = by_name["Q-CNN k-means"], by_name["Q-CNN EC"]
    cfg = ec.report.config
    ly = ec.report.layers[0]
    wide = ly["M"] is not None and ly["M"] > cfg["wide_subspaces"]
    text = (f"Wide-layer settings: layers with more than wide_subspaces={cfg['wide_subspaces']} subspaces "
            f"({'this one has' if wide else 'not this one:'} M={ly['M']}) use k-means with "
            f"n_init={cfg['wide_kmeans_n_init']}, max_iter={cfg['wide_kmeans_max_iter']} and "
            f"{cfg['wide_ec_iters']} EC sweeps (other layers: n_init={cfg['kmeans_n_init']}, "
            f"max_iter={cfg['kmeans_max_iter']}, {cfg['ec_iters']} sweeps). ")
    err_km, err_ec = km.rel_error, ec.rel_error
    if err_ec > err_km:
        return text + (f"On this random layer EC overfits: it lowers the response error on the calibration inputs "
                       f"({ly['response_error_kmeans']:.4f} -> {ly['response_error_ec']:.4f}, per-layer table) but the "
                       f"held-out output error is worse than plain k-means ({err_ec:.4f} vs {err_km:.4f}). With "
                       f"random weights and random inputs there is no structure for PQ or EC to exploit, "
                       f"so what EC fits to the "
                       f"{len(case.calib)} calibration rows (every code and codeword of {ly['M']} subspaces) does not "
                       "carry over to new inputs; the edge CNN rows are the meaningful accuracy test.")
    return text + f"EC's held-out output error {err_ec:.4f} vs k-means {err_km:.4f}."


def _acc(v, ref) -> tuple[str, str]:
    if v.accuracy is None:
        return "n/a", "n/a"
    return f"{100 * v.accuracy:.2f}", f"{100 * (v.accuracy - ref.accuracy):+.2f}"


def size_table(cases: list) -> Table:
    t = Table("Size and accuracy", ["model", "variant", "file bytes", "compression ×", "accuracy %",
                                    "Δ points", "output rel. error", "build s"],
              note="compression = float file bytes / variant file bytes; Δ = accuracy - float accuracy "
                   "(percentage points); output rel. error = ||y - y_float|| / ||y_float|| on the eval inputs.")
    for c in cases:
        ref = c.variants[0]
        for v in c.variants:
            acc, delta = _acc(v, ref)
            t.add(c.name, v.name, f"{v.file_bytes:,}", f"{ref.file_bytes / v.file_bytes:.2f}", acc, delta,
                  f"{v.rel_error:.4f}", f"{v.build_s:.1f}")
    return t


def latency_table(cases: list, threads: tuple[int, ...], batches: tuple[int, ...]) -> Table:
    t = Table("Latency (ms per call)", ["model", "batch", "threads", "variant", "median ms", "p90 ms", "runs",
                                        "speed-up ×"],
              note="speed-up = float median / variant median (> 1 is faster than float, < 1 is slower).")
    for c in cases:
        for batch in batches:
            for th in threads:
                ref = c.variants[0].latency[batch, th]
                for v in c.variants:
                    lat = v.latency[batch, th]
                    t.add(c.name, batch, th, v.name, f"{lat.median_ms:.3f}", f"{lat.p90_ms:.3f}", lat.runs,
                          f"{ref.median_ms / lat.median_ms:.2f}")
    return t


def bench_notes(cfg, cases: list, settings: str, native: str, segments: str, native_path: str,
                seconds: float) -> list[str]:
    """The notes under the tables of qcnn.md (how each figure was made); the last one is the wall time."""
    return [
        f"Held-out accuracy on the first {len(cases[0].x_eval)} images of the MNIST test split; calibration "
        f"({cfg.calib_images} images) drawn from the train split only.",
        f"The wide FC model has random weights, so accuracy is n/a; its output error is measured on "
        f"{cfg.wide_eval} held-out random N(0, 1) inputs (calibration: {len(cases[-1].calib)} other random inputs, "
        "at least 2 D so EC's least squares is overdetermined). Random weights have no structure for "
        "k-means to exploit: this model measures size and speed, its error is a worst case.",
        wide_note(cases[-1]),
        f"Q-CNN main rows: edge CNN with the shipped model's settings ({settings}"
        "; chosen on the train split's last 1,000 images, not on the test split), cloud CNN with the "
        "compressor's CompressConfig defaults but conv_dsub=8 (the shipped file's); the wide FC also sets "
        "last_fc=pq (its only layer) and fc_k=16. "
        "The sweep sets conv_k=fc_k=K and conv_dsub=fc_dsub=dsub, the frontier the settings named in its table; "
        "both report the held-out accuracy of each file (runtime default kernels: native where K <= 16).",
        "Kernels: the Q-CNN k-means and Q-CNN EC rows run the numba float-table kernels (the reference); "
        f"{native} runs the same EC file on the native fast-scan kernels ({native_path}: 4-bit codes, "
        "lookup tables quantized to 8 bits per sample, SIMD byte shuffles, 16-bit accumulators), the whole graph "
        "as one native net (edge_workers/qcnn/native_net.py: the float conv, ReLU, pooling and FC layers in C "
        f"too, one call per batch); {segments} runs the same PQ kernels with the layers between them as "
        "onnxruntime sessions (the runtime's segments mode). With 2 threads the native rows split a batch: "
        "the net's caller and a C helper thread that spins between calls take samples one by one from a "
        "shared counter; segments: two halves, the second on a Python thread.",
        "int8 QDQ = onnxruntime.quantization.quantize_static after quant_pre_process: QDQ format, per-channel "
        "int8 weights, uint8 activations, MinMax calibration, reduce_range on CPUs without VNNI "
        "(onnxruntime's CPU guidance).",
        f"Latency: {cfg.repeats} timed calls per cell after 3 warm-up calls (fewer if a cell passed "
        f"{cfg.max_seconds:g} s; see runs), threads pinned via SessionOptions.intra_op_num_threads and the "
        "Q-CNN runtime's threads option. The variants of one model, batch and thread count are timed in "
        "alternating blocks of 50 calls with 100 ms pauses (infra/bench/timing.py: measure_interleaved), so "
        "drifts in the speed of this shared VM hit them alike; numba's OpenMP threads wait passively "
        "(OMP_WAIT_POLICY=PASSIVE) and the pauses let onnxruntime's spinning workers stop, so one variant's "
        "threads do not take a core from the next. The absolute figures still move from run to run.",
        f"Wall time of this run: {seconds:.0f} s.",
    ]
