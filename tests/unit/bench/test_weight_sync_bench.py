"""bench/weight_sync.py runs end to end on the test model: every transport syncs and reports."""

import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_weight_sync_benchmark_times_every_transport(ray_session, monkeypatch, capsys, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT))
    medians = importlib.import_module("bench.weight_sync").main(
        ["--size", "test", "--repeats", "1", "--workdir", str(tmp_path), "--bucket-mb", "1"])
    out = capsys.readouterr().out
    assert medians.keys() == {"object_store", "collective", "ipc"}
    for transport, figures in medians.items():
        assert figures["seconds"] > 0 and figures["GB per generator"] > 0, transport
        assert transport in out
    assert medians["object_store"]["GB per generator"] == medians["collective"]["GB per generator"] \
        == medians["ipc"]["GB per generator"]
    assert "faster than the object store" in out
