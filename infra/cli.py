"""The `edgeq` command: parses options, loads the configuration once, runs a subcommand.

Heavy modules (Ray, onnxruntime, torch) are imported inside the subcommand
that needs them, so `edgeq publish` runs on a device with the base install.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from edge_workers.config import CODECS, POLICIES
from edge_workers.denoise import METHODS as DENOISE_METHODS
from infra.config import EdgeqConfig, load_config, override
from publishers.config import PublishConfig
from publishers.errors import ConfigError, EdgeqError
from publishers.mqtt import parse_address

logger = logging.getLogger(__name__)


def progress(line: str) -> None:
    """Progress lines go to stderr so stdout carries only results."""
    print(line, file=sys.stderr, flush=True)


def _mqtt_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker connection (config section `mqtt`, env EDGEQ_MQTT__*)")
    g.add_argument("--broker", metavar="HOST:PORT", help="MQTT broker address (default 127.0.0.1:1883)")
    g.add_argument("--qos", type=int, choices=(0, 1), help="QoS for frames and results (default 1)")
    g.add_argument("--username", help="MQTT username")
    g.add_argument("--password-file", help="file holding the MQTT password (or set EDGEQ_MQTT__PASSWORD)")
    g.add_argument("--tls-ca", help="CA certificate (PEM); turns TLS on")
    g.add_argument("--tls-cert", help="client certificate (PEM)")
    g.add_argument("--tls-key", help="client key (PEM)")


def _publish_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices (config section `publish`, env EDGEQ_PUBLISH__*)")
    g.add_argument("--devices", type=int, help="number of simulated devices (default 4)")
    g.add_argument("--rate", dest="rate_hz", type=float, help="frames/s per device, 0 = unthrottled (default 50)")
    g.add_argument("--count", type=int, help="frames per device, 0 = unlimited (default 250)")
    g.add_argument("--duration", dest="duration_s", type=float, help="stop after this many seconds (default: no limit)")
    g.add_argument("--source", choices=("mnist", "directory", "camera"), help="frame source (default mnist)")
    g.add_argument("--split", choices=("train", "test"), help="dataset split to replay (default test)")
    g.add_argument("--data-dir", help="MNIST IDX directory (default data/mnist)")
    g.add_argument("--directory", help="directory of .npy/.pgm/.png/.jpg frames for --source directory")
    g.add_argument("--frame-shape", help="HxW of directory/camera frames (default 28x28)")
    g.add_argument("--noise", choices=("none", "gaussian", "salt-and-pepper"), help="simulated sensor noise")
    g.add_argument("--noise-level", type=float, help="gaussian sigma / salt-and-pepper fraction, 0..1 (default 0.2)")
    g.add_argument("--queue-size", type=int, help="frames buffered per device (default 1000)")
    g.add_argument("--drop-policy", choices=("block", "drop-oldest", "drop-newest"), help="when the buffer is full")
    g.add_argument("--device-prefix", help="device ids are PREFIX0, PREFIX1, ... (default dev)")
    g.add_argument("--seed", type=int, help="noise RNG seed (default 0)")
    g.add_argument("--shuffle", action="store_true", default=None,
                   help="replay the mnist split in a random order seeded by --seed")
    g.add_argument("--topic", choices=("frames", "train", "eval"),
                   help="frames to answer (default), or labelled frames for the cloud to learn from / score on")


def _head_options(p: argparse.ArgumentParser) -> None:
    """`edgeq publish` only: run a partition's head on the devices
    (config section `publish`: head, cut, tensor_codec)."""
    from publishers import topics
    from publishers.tensor_codec import CODECS as TENSOR_CODECS

    tensors, frames = (f.replace("+", "<device id>") for f in (topics.TENSORS_FILTER, topics.FRAMES_FILTER))
    g = p.add_argument_group(
        "split computing: the head of a partitioned model on the device (docs/partition.md, Device/edge split)",
        "Each frame goes through the head (onnxruntime, 1 thread) and the tensor at the cut is published as a "
        f"tensor frame (wire format version 2) on {tensors} instead of the pixels on "
        f"{frames}. Make the head with `edgeq partition models/edge_cnn.onnx --cut pool2` "
        "(writes models/partitions/edge_cnn/). Without --head, onnxruntime is not needed.")
    g.add_argument("--head", metavar="HEAD.onnx|MANIFEST",
                   help="a head file <cut id>.head.onnx, its <model>.partition.json beside it (e.g. "
                        "models/partitions/edge_cnn/edge_cnn@pool2.head.onnx), or a manifest with --cut")
    g.add_argument("--cut", metavar="POINT|ID", help="with a manifest as --head: the cut (pool2 or edge_cnn@pool2)")
    g.add_argument("--codec", dest="tensor_codec", choices=TENSOR_CODECS,
                   help="tensor codec, one the cut offers (default int8: one scale per frame, 590 B per frame at "
                        "edge_cnn@pool2 against 828 for the pixels; float32 is exact, pq8 needs `partition --pq`)")


def _tier_options(p: argparse.ArgumentParser, edge: bool = True, cloud: bool = True) -> None:
    """Options of the `edge`, `cloud` and `ray` sections; dests are SECTION__FIELD."""
    g = p.add_argument_group("Ray (config section `ray`, env EDGEQ_RAY__*)")
    g.add_argument("--ray-address", dest="ray__address", metavar="ADDRESS",
                   help="connect to this Ray cluster (e.g. auto or HOST:6379); default: start a local Ray")
    g.add_argument("--ray-namespace", dest="ray__namespace", metavar="NAMESPACE",
                   help="Ray namespace of the named actors (default edgeq)")
    g.add_argument("--models-dir", dest="edge__models_dir", metavar="DIR",
                   help="directory of the model files, for edge and cloud workers (default models/)")
    g.add_argument("--metrics-addr", dest="metrics_addr",
                   help="bind address of the workers' metrics endpoints (default 127.0.0.1)")
    if edge:
        g = p.add_argument_group("edge workers (config section `edge`, env EDGEQ_EDGE__*)")
        g.add_argument("--edge-actors", dest="edge__actors", metavar="ACTORS", type=int,
                       help="edge worker actors (default 2)")
        g.add_argument("--policy", dest="edge__policy", choices=POLICIES,
                       help="where frames are answered (default confidence)")
        g.add_argument("--threshold", dest="edge__threshold", metavar="THRESHOLD", type=float,
                       help="confidence (1 - normalised entropy) to answer at the edge (default 0.9)")
        g.add_argument("--codec", dest="edge__codec", choices=CODECS,
                       help="what the edge sends to the cloud (default denoised)")
        g.add_argument("--runtime", dest="edge__runtime", metavar="RUNTIME",
                       help="edge model runtime: qcnn or onnx (default qcnn)")
        g.add_argument("--model", dest="edge__model", metavar="MODEL",
                       help="edge model file in the models dir (default edge_cnn.qcnn.onnx; edge_cnn.onnx with "
                            "--runtime onnx)")
        g.add_argument("--denoise", dest="edge__denoise",
                       choices=DENOISE_METHODS,
                       help="noise reduction at the edge (default auto)")
        g.add_argument("--pca-components", dest="edge__pca_components", metavar="PCA_COMPONENTS", type=int,
                       help="PCA coefficients for the pca-* codecs (default 64, must match the cloud PCA model)")
        g.add_argument("--batch-max", dest="edge__batch_max", metavar="BATCH_MAX", type=int,
                       help="max frames per micro-batch (default 64)")
        g.add_argument("--batch-wait-ms", dest="edge__batch_wait_ms", metavar="BATCH_WAIT", type=float,
                       help="max wait for a micro-batch to fill after its first frame (default 0: take what is queued)")
        g.add_argument("--cloud-timeout", dest="edge__cloud_timeout_s", metavar="CLOUD_TIMEOUT", type=float,
                       help="seconds before a cloud call falls back to a degraded edge answer (default 2)")
        g.add_argument("--edge-metrics-port", dest="edge__metrics_port", metavar="METRICS_PORT", type=int,
                       help="edge worker i serves metrics on this port + i; 0 = any free port (default 9601)")
        g.add_argument("--uplink-budget-kbps", dest="edge__uplink_budget_kbps", metavar="KBPS", type=float,
                       help="adaptive offload: lower the threshold while an edge actor's uplink to the cloud exceeds "
                       "this many kbit/s (default: no budget; docs/partition.md)")
        g.add_argument("--p99-budget-ms", dest="edge__p99_budget_ms", metavar="MS", type=float,
                       help="adaptive offload: lower the threshold while the p99 of an edge actor's answers exceeds "
                       "this (default: no budget)")
        g.add_argument("--control-period", dest="edge__control_period_s", metavar="SECONDS", type=float,
                       help="adaptive offload: seconds per control tick and measurement window (default 1)")
    if cloud:
        g = p.add_argument_group("cloud workers (config section `cloud`, env EDGEQ_CLOUD__*)")
        g.add_argument("--cloud-actors", dest="cloud__actors", metavar="ACTORS", type=int,
                       help="cloud worker actors (default 1)")
        g.add_argument("--cloud-metrics-port", dest="cloud__metrics_port", metavar="METRICS_PORT", type=int,
                       help="cloud worker i serves metrics on this port + i; 0 = any free port (default 9701)")


def _apply_sections(cfg: EdgeqConfig, args: argparse.Namespace) -> EdgeqConfig:
    for section in ("edge", "cloud", "ray", "demo"):
        prefix = f"{section}__"
        given = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}
        if section in ("edge", "cloud") and getattr(args, "metrics_addr", None):
            given["metrics_addr"] = args.metrics_addr
        try:
            setattr(cfg, section, override(getattr(cfg, section), **given))
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from err
    if getattr(args, "edge__models_dir", None):  # --models-dir: one models directory for both tiers
        cfg.cloud = override(cfg.cloud, models_dir=args.edge__models_dir)
    return cfg


def _apply_common(cfg: EdgeqConfig, args: argparse.Namespace) -> EdgeqConfig:
    host = port = None
    if getattr(args, "broker", None):
        host, port = parse_address(args.broker)
    given = {n: getattr(args, n, None) for n in ("qos", "username", "password_file", "tls_ca", "tls_cert", "tls_key")}
    cfg.mqtt = override(cfg.mqtt, host=host, port=port, **given)
    if hasattr(args, "devices"):  # subcommands with the device options (their dests are the field names)
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(PublishConfig) if hasattr(args, f.name)}
        cfg.publish = override(cfg.publish, **given)
    return _apply_sections(cfg, args)


def cmd_publish(cfg: EdgeqConfig, args: argparse.Namespace) -> int:
    from publishers.run import publish

    report = publish(cfg.mqtt, cfg.publish, progress=progress)
    print(report.summary())
    return 1 if report.dropped.get("unconfirmed_at_exit") else 0


def cmd_broker(cfg: EdgeqConfig, args: argparse.Namespace) -> int:
    import time

    from infra.broker import MosquittoBroker

    secure = getattr(args, "secure", None)
    # --secure: TLS on --host, the plain listener on loopback only (infra/mosquitto/prod-dynsec.conf says why).
    host = "127.0.0.1" if secure else args.host
    with MosquittoBroker(port=args.port, host=host, secure_dir=secure, tls_port=args.tls_port,
                         tls_host=args.host, auth=args.auth) as broker:
        tls = (f", TLS on {broker.host}:{broker.tls_port} (accounts and ACLs from {secure}, {broker.auth})"
               if secure else "")
        progress(f"[broker] mosquitto listening on {broker.address}{tls}; config and log in {broker.workdir}; "
                 "Ctrl-C stops")
        while broker.running:
            time.sleep(0.5)
    return 1


def cmd_demo(cfg: EdgeqConfig, args: argparse.Namespace) -> int:
    from infra.demo import run_pipeline, summary

    result = run_pipeline(cfg, use_broker=args.broker is not None, progress=progress)
    print(summary(result))
    return 1 if result.lost else 0


def cmd_serve(cfg: EdgeqConfig, args: argparse.Namespace) -> int:
    from infra.serve import serve

    return serve(cfg, tier=args.command, progress=progress)


def cmd_train(cfg: EdgeqConfig, args: argparse.Namespace) -> int:
    from cloud_workers.train import TrainConfig, train_reference_models
    from publishers.sources import default_data_dir

    models = tuple(args.models.split(",")) if args.models else ("edge", "cloud")
    if not models or any(m not in ("edge", "cloud", "pca") for m in models):
        raise ConfigError(f"--models must be a comma-separated subset of edge,cloud,pca, got {args.models!r}")
    cnns = tuple(m for m in models if m != "pca")
    train_cfg = override(
        TrainConfig(data_dir=str(default_data_dir())), data_dir=args.data_dir, out_dir=args.out_dir,
        edge_epochs=args.edge_epochs, cloud_epochs=args.cloud_epochs, seed=args.seed, limit=args.limit,
        models=cnns or None,
    )
    result = train_reference_models(train_cfg, progress=progress) if cnns else {"models": {}}
    if "pca" in models:  # PCA + cloud PCA MLP: scikit-learn only, no torch
        from cloud_workers.pca_model import fit_reduction_models

        result["models"].update(fit_reduction_models(train_cfg.data_dir, train_cfg.out_dir, seed=train_cfg.seed,
                                                     limit=train_cfg.limit, progress=progress))
    for name, info in result["models"].items():
        if "test_accuracy" not in info:
            continue
        acc = info["test_accuracy"]
        print(f"{name}: held-out test accuracy {100 * acc['clean']:.2f} % clean, "
              f"{100 * acc['gaussian_0.2']:.2f} % with gaussian noise 0.2 -> {train_cfg.out_dir}/{info['file']}")
    return 0


def cmd_compress(cfg: EdgeqConfig, args: argparse.Namespace) -> int:
    from edge_workers.qcnn.cli import run_compress

    return run_compress(args, progress=progress)


def cmd_partition(cfg: EdgeqConfig, args: argparse.Namespace) -> int:
    from infra.partition_cli import run

    return run(args, progress=progress)


def cmd_experiment(cfg: EdgeqConfig, args: argparse.Namespace) -> int:
    from infra.experiment_cli import run

    return run(args, progress=progress)


def cmd_bench(cfg: EdgeqConfig, args: argparse.Namespace) -> int:
    from infra import bench

    print(bench.run(args, progress=progress))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeq",
        description="Deep learning at the edge: MQTT devices, Ray edge and cloud workers, quantized CNNs.",
    )
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config file (sections: mqtt, publish, edge, cloud, ray, demo)")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "publish", help="run simulated devices that publish frames to the broker",
        description="Simulated devices publish wire frames at QoS 1 (progress on stderr, a summary with bytes per "
        "frame on stdout; exit status 1 if frames were not confirmed by the broker). With --head they run a "
        "partition's head and publish tensor frames instead.",
        epilog="example: edgeq publish --broker 127.0.0.1:1883 --devices 2 --count 100 "
               "--head models/partitions/edge_cnn/edge_cnn@pool2.head.onnx --codec int8")
    _mqtt_options(p)
    _publish_options(p)
    _head_options(p)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser(
        "demo", help="run the whole system on this machine (broker, Ray, cloud, edge, devices) and print a summary",
        description="Starts Mosquitto (unless --broker is given), a local Ray (unless --ray-address), cloud and "
        "edge workers and simulated devices; prints live progress, then a summary. Exit status 1 if frames were lost.",
    )
    _mqtt_options(p)
    _publish_options(p)
    _tier_options(p)
    g = p.add_argument_group("demo (config section `demo`, env EDGEQ_DEMO__*)")
    g.add_argument("--answer-timeout", dest="demo__answer_timeout_s", metavar="ANSWER_TIMEOUT", type=float,
                   help="after the devices finish, wait at most this long for answers (default 30)")
    g.add_argument("--targets-file", dest="demo__targets_file", metavar="TARGETS_FILE",
                   help="Prometheus file-SD targets file to write (default infra/prometheus/targets/edgeq.json)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("edge", help="run edge workers on a Ray cluster until interrupted",
                       description="Starts edge worker actors (Ray resource `edge`) that join the broker's shared "
                       "subscription and forward uncertain frames to the cloud workers started by `edgeq cloud`.")
    _mqtt_options(p)
    _tier_options(p, cloud=False)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("cloud", help="run cloud workers on a Ray cluster until interrupted",
                       description="Starts cloud worker actors (Ray resource `cloud`), named edgeq-cloud-<i> in the "
                       "Ray namespace, for edge workers to call.")
    _tier_options(p, edge=False)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("broker", help="run Mosquitto in the foreground (development config, "
                                      "or the production one with --secure DIR)")
    _mqtt_options(p)
    p.add_argument("--port", type=int, default=1883, help="port to listen on (default 1883)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; with --secure, of the "
                                                        "TLS listener)")
    p.add_argument("--secure", metavar="DIR",
                   help="production config: no anonymous clients, accounts, publish and subscribe ACLs and TLS from "
                        "the files in DIR (make them with `python -m infra.security init DIR`); docs/security.md")
    p.add_argument("--auth", choices=("auto", "dynsec", "acl_file"), default="auto",
                   help="with --secure: 'dynsec' = Mosquitto's dynamic-security plugin (prod-dynsec.conf, checks "
                        "SUBSCRIBE too), 'acl_file' = prod.conf (does not check SUBSCRIBE), 'auto' (default) = "
                        "dynsec when the plugin and DIR/dynamic-security.json exist")
    p.add_argument("--tls-port", type=int, default=8883, help="TLS listener port with --secure (default 8883)")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("train", help="train the reference edge and cloud CNNs and export ONNX (needs edgeq[train])")
    p.add_argument("--data-dir", help="MNIST IDX directory (default data/mnist)")
    p.add_argument("--out-dir", help="where to write the ONNX models and manifest (default models)")
    p.add_argument("--edge-epochs", type=int, help="training epochs for the edge CNN (default 15)")
    p.add_argument("--cloud-epochs", type=int, help="training epochs for the cloud CNN (default 15)")
    p.add_argument("--limit", type=int, help="train on only this many images (smoke tests)")
    p.add_argument("--seed", type=int, help="random seed (default 1234)")
    p.add_argument("--models", help="comma-separated models to train: edge,cloud,pca (default edge,cloud; "
                                    "pca = PCA + cloud PCA MLP, no torch needed)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compress", help="compress a float ONNX CNN into a Q-CNN model (needs edgeq[server])")
    from edge_workers.qcnn.cli import add_compress_arguments

    add_compress_arguments(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("partition", help="cut a float or Q-CNN ONNX model into head/tail pairs at every legal "
                                         "point (split computing; needs edgeq[server])")
    from infra.partition_cli import add_arguments as add_partition_arguments

    add_partition_arguments(p)
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("bench",
                       help="run a benchmark; tables go to stdout and docs/results/ (needs edgeq[server,bench])")
    from infra.bench import (
        add_parsers as add_bench_parsers,  # one sub-command per registered benchmark
    )

    add_bench_parsers(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("experiment", help="run an experiment through the real pipeline; results go to docs/results/ "
                                          "(needs edgeq[server,bench])")
    from infra.experiment_cli import add_arguments as add_experiment_arguments

    add_experiment_arguments(p)
    p.set_defaults(func=cmd_experiment)
    return parser


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    func: Callable[[EdgeqConfig, argparse.Namespace], int] = args.func
    # SIGTERM unwinds like Ctrl-C, so a broker or workers this process started are stopped cleanly.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        cfg = _apply_common(load_config(args.config, os.environ), args)
        return func(cfg, args)
    except EdgeqError as err:
        print(f"edgeq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
