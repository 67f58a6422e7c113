"""Tables of `edgeq bench qcnn` beyond size and latency: the fast-scan targets, per-layer errors, the wide-FC note."""

from __future__ import annotations

from infra.bench.report import Table


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _ratio_row(t: Table, what: str, num: float, den: float, goal: float) -> None:
    ratio = num / den
    t.add(what, f"{ratio:.2f}×", f"≥ {goal:g}×", "yes" if ratio >= goal else "no")


def targets_table(cases: list, threads: tuple[int, ...], batches: tuple[int, ...], native: str) -> Table:
    """Issue 8's goals, from this run's medians: the wide FC and the edge CNN on the native kernels."""
    t = Table("Fast-scan targets (this run)", ["what", "measured", "goal", "met"],
              note=f"Ratios of median latencies from the latency table below (same run, same process); "
                   f"\"{native}\" = the EC file on the native fast-scan kernels. Agreement = share of held-out "
                   "images where the native kernels (8-bit tables) and the numba kernels (float tables) predict "
                   "the same class for the same EC file.")
    edge, wide = cases
    e, w = ({v.name: v for v in c.variants} for c in (edge, wide))
    for th in threads:
        lat = lambda name, b=1: w[name].latency[b, th].median_ms  # noqa: E731
        _ratio_row(t, f"{wide.name}, batch 1, {th} thread(s): float / native", lat("float"), lat(native), 10)
        _ratio_row(t, f"{wide.name}, batch 1, {th} thread(s): int8 QDQ / native", lat("int8 QDQ"), lat(native), 3)
    for b in batches:
        for th in threads:
            _ratio_row(t, f"{edge.name}, batch {b}, {th} thread(s): int8 QDQ / native",
                       e["int8 QDQ"].latency[b, th].median_ms, e[native].latency[b, th].median_ms, 1)
    agree = float((e[native].top1 == e["Q-CNN EC"].top1).mean())
    t.add(f"{edge.name}: native vs float-table predictions", f"{100 * agree:.2f} %", "≥ 99.5 %",
          "yes" if agree >= 0.995 else "no")
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
                       f"random weights and random inputs there is no structure for PQ or EC to exploit, so what EC fits to the "
                       f"{len(case.calib)} calibration rows (every code and codeword of {ly['M']} subspaces) does not "
                       "carry over to new inputs; the edge CNN rows are the meaningful accuracy test.")
    return text + f"EC's held-out output error {err_ec:.4f} vs k-means {err_km:.4f}."


