"""Result messages: one result object or an array of one device's results (publishers/results.py), and the
readers that count them (collector, pipeline benchmark, device)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from infra.bench.pipeline_phases import _Answers
from infra.collector import ResultStats
from publishers import results, topics
from publishers.config import PublishConfig
from publishers.mqtt import MqttConfig
from publishers.run import build_devices
from tests.conftest import DATA_DIR


def result(seq: int, device: str = "dev0", **kw) -> results.Result:
    args = {"cls": seq % 10, "confidence": 0.9731, "tier": "edge", "degraded": False, "latency_ms": 3.412,
            "label": seq % 10}
    args.update(kw)
    return results.Result(device, seq, **args)


def as_object(r: results.Result) -> dict:
    msg = {"v": 1, "device": r.device, "seq": r.seq, "class": r.cls, "confidence": round(r.confidence, 4),
           "tier": r.tier, "degraded": r.degraded, "latency_ms": round(r.latency_ms, 3)}
    if r.label is not None:
        msg["label"] = r.label
    return msg


def test_encode_many_is_json_dumps_of_the_objects() -> None:
    rng = np.random.default_rng(0)
    rs = [results.Result("d\u00e9v\"x", int(rng.integers(2**40)), int(rng.integers(10)), float(rng.random()),
                         "cloud" if i % 2 else "edge", bool(i % 3), float(rng.random() * 100),
                         i % 10 if i % 4 else None)
          for i in range(results.MAX_RESULTS_PER_MESSAGE)]
    for n in (2, 3, 64, results.MAX_RESULTS_PER_MESSAGE):
        assert results.encode_many(rs[:n]) == json.dumps([as_object(r) for r in rs[:n]], separators=(",", ":")).encode()
    # One result is exactly today's single object, not an array of one.
    assert results.encode_many(rs[:1]) == results.encode(rs[0]) == json.dumps(as_object(rs[0]),
                                                                                separators=(",", ":")).encode()


def test_decode_all_round_trips_one_and_many() -> None:
    one = result(17)
    assert results.decode_all(results.encode_many([one])) == [one]
    assert results.decode_all(results.encode(one)) == [one]
    assert results.decode(results.encode(one)) == one
    many = [result(s, label=None if s % 2 else s % 10, tier="cloud" if s % 3 else "edge") for s in range(5, 45)]
    assert results.decode_all(results.encode_many(many)) == many  # same order


def test_encode_many_caps_and_rejects_empty_and_mixed() -> None:
    cap = results.MAX_RESULTS_PER_MESSAGE
    assert cap == 256
    assert len(results.decode_all(results.encode_many([result(i) for i in range(cap)]))) == cap
    with pytest.raises(ValueError, match="257 results in one message, at most 256"):
        results.encode_many([result(i) for i in range(cap + 1)])
    with pytest.raises(ValueError, match="no results"):
        results.encode_many([])
    with pytest.raises(ValueError, match="more than one device"):
        results.encode_many([result(1, "dev0"), result(2, "dev1")])


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@pytest.mark.parametrize("payload, error", [
    (b"[]", "an empty array"),
    (dumps([as_object(result(1)), 7]), "element 1: expected an object with v=1"),
    (dumps([as_object(result(1)), [as_object(result(2))]]), "element 1: expected an object with v=1"),
    (dumps([as_object(result(1, "dev0")), as_object(result(2, "dev1"))]), "results of 2 devices in one message"),
    (dumps([as_object(result(1)), {**as_object(result(2)), "v": 2}]), "element 1: expected an object with v=1"),
    (dumps({**as_object(result(1)), "v": 2}), "expected an object with v=1"),
    (dumps([as_object(result(1)), {**as_object(result(2)), "tier": "fog"}]), "element 1: tier must be one of"),
    (dumps([{k: v for k, v in as_object(result(1)).items() if k != "seq"}, as_object(result(2))]), "element 0: 'seq'"),
    (dumps([as_object(result(i)) for i in range(results.MAX_RESULTS_PER_MESSAGE + 1)]), "257 results, at most 256"),
    (b'[{"v":1,"device":"dev0"', "bad result message"),
    (b"\xff\xfe", "bad result message"),
    (b"7", "expected an object with v=1"),
])
def test_decode_all_rejects_the_whole_message(payload: bytes, error: str) -> None:
    with pytest.raises(results.ResultDecodeError, match=error):
        results.decode_all(payload)


def test_decode_of_a_batch_says_to_use_decode_all() -> None:
    with pytest.raises(results.ResultDecodeError, match="a batch of 3 results: use decode_all"):
        results.decode(results.encode_many([result(1), result(2), result(3)]))


def test_collector_counts_results_and_messages_separately() -> None:
    stats = ResultStats()
    first = results.encode_many([result(1), result(2, label=3), result(3)])
    stats.add(first)
    assert stats.messages == 1 and stats.result_count == 3 and len(stats.unique) == 3 and stats.duplicates == 0
    assert stats.labelled == 3 and stats.correct == 2 and stats.bytes == len(first)
    # A later batch of the same device repeats seq 2 (a redelivered frame answered again): one duplicate.
    stats.add(results.encode_many([result(2, label=3), result(4)]))
    stats.add(results.encode(result(5, "dev1", tier="cloud")))
    assert stats.messages == 3 and stats.result_count == 6 and len(stats.unique) == 5 and stats.duplicates == 1
    assert stats.tiers == {"edge": 4, "cloud": 1} and stats.labelled == 5 and stats.correct == 4
    assert len(stats.latencies_ms) == 5
    # A bad batch counts once as a bad message, and none of its results.
    stats.add(dumps([as_object(result(6)), {"v": 1}]))
    assert stats.messages == 4 and stats.bad_messages == 1 and stats.result_count == 6 and stats.duplicates == 1
    assert ("dev0", 6) not in stats.unique


def test_pipeline_bench_answers_count_duplicates_per_result() -> None:
    answers = _Answers()
    payloads = [results.encode_many([result(1), result(2), result(3)]), results.encode_many([result(3), result(4)]),
                b"not json"]
    taken = answers.add(np.array([10, 20, 30], dtype=np.int64), payloads, sum(map(len, payloads)))
    assert taken == 3 and answers.messages == 3 and answers.result_count == 5 and len(answers.seen) == 4
    assert answers.result_count - len(answers.seen) == 1  # the duplicate the phase reports
    assert answers.arrival == [10, 10, 10, 20]  # each result arrived with its message


def test_a_device_takes_every_seq_of_a_batch() -> None:
    cfg = PublishConfig(devices=1, count=1, rate_hz=0, data_dir=str(DATA_DIR), resend_after_s=1.0)
    device = build_devices(MqttConfig(), cfg)[0]  # never started: its DrivenLoop handler is called directly

    def deliver(payload: bytes) -> None:  # as DrivenLoop hands over a QoS 0 PUBLISH on the results topic
        device._on_incoming(topics.results(device.device_id), payload, 0, 0)

    deliver(results.encode_many([result(s, device.device_id) for s in (3, 1, 2)]))
    deliver(results.encode(result(7, device.device_id)))
    deliver(b"[]")
    assert list(device._answers) == [3, 1, 2, 7] and device.bad_results == 1
