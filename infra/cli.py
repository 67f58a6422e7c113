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
from typing import Callable, Sequence

from infra.config import EdgeqConfig, load_config, override
from publishers.config import PublishConfig
from publishers.errors import EdgeqError
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


def _apply_common(cfg: EdgeqConfig, args: argparse.Namespace) -> EdgeqConfig:
    host = port = None
    if getattr(args, "broker", None):
        host, port = parse_address(args.broker)
    given = {n: getattr(args, n, None) for n in ("qos", "username", "password_file", "tls_ca", "tls_cert", "tls_key")}
    cfg.mqtt = override(cfg.mqtt, host=host, port=port, **given)
    if hasattr(args, "devices"):  # subcommands with the device options (their dests are the field names)
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(PublishConfig) if hasattr(args, f.name)}
        cfg.publish = override(cfg.publish, **given)
    return cfg


def cmd_publish(cfg: EdgeqConfig, args: argparse.Namespace) -> int:
    from publishers.run import publish

    report = publish(cfg.mqtt, cfg.publish, progress=progress)
    print(report.summary())
    return 1 if report.dropped.get("unconfirmed_at_exit") else 0


def cmd_broker(cfg: EdgeqConfig, args: argparse.Namespace) -> int:
    import time

    from infra.broker import MosquittoBroker

    with MosquittoBroker(port=args.port, host=args.host) as broker:
        progress(f"[broker] mosquitto listening on {broker.address}; config and log in {broker.workdir}; Ctrl-C stops")
        while broker.running:
            time.sleep(0.5)
    return 1


def cmd_demo(cfg: EdgeqConfig, args: argparse.Namespace) -> int:
    from infra.demo import run_demo

    print(run_demo(cfg.mqtt, cfg.publish, use_broker=args.broker is not None, progress=progress))
    return 0


def cmd_train(cfg: EdgeqConfig, args: argparse.Namespace) -> int:
    from cloud_workers.train import TrainConfig, train_reference_models
    from publishers.sources import default_data_dir

    train_cfg = override(
        TrainConfig(data_dir=str(default_data_dir())), data_dir=args.data_dir, out_dir=args.out_dir,
        edge_epochs=args.edge_epochs, cloud_epochs=args.cloud_epochs, seed=args.seed, limit=args.limit,
        models=tuple(args.models.split(",")) if args.models else None,
    )
    result = train_reference_models(train_cfg, progress=progress)
    for name, info in result["models"].items():
        acc = info["test_accuracy"]
        print(f"{name}: held-out test accuracy {100 * acc['clean']:.2f} % clean, "
              f"{100 * acc['gaussian_0.2']:.2f} % with gaussian noise 0.2 -> {train_cfg.out_dir}/{info['file']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeq",
        description="Deep learning at the edge: MQTT devices, Ray edge and cloud workers, quantized CNNs.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config file (sections: mqtt, publish)")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("publish", help="run simulated devices that publish frames to the broker")
    _mqtt_options(p)
    _publish_options(p)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("demo", help="run the system on this machine and print a summary")
    _mqtt_options(p)
    _publish_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("broker", help="run a development Mosquitto broker in the foreground")
    _mqtt_options(p)
    p.add_argument("--port", type=int, default=1883, help="port to listen on (default 1883)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("train", help="train the reference edge and cloud CNNs and export ONNX (needs edgeq[train])")
    p.add_argument("--data-dir", help="MNIST IDX directory (default data/mnist)")
    p.add_argument("--out-dir", help="where to write the ONNX models and manifest (default models)")
    p.add_argument("--edge-epochs", type=int, help="training epochs for the edge CNN (default 15)")
    p.add_argument("--cloud-epochs", type=int, help="training epochs for the cloud CNN (default 15)")
    p.add_argument("--limit", type=int, help="train on only this many images (smoke tests)")
    p.add_argument("--seed", type=int, help="random seed (default 1234)")
    p.add_argument("--models", help="comma-separated models to train: edge,cloud (default both)")
    p.set_defaults(func=cmd_train)
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
