"""bench serve's parts on a tiny model: the load generator, percentiles, the summary, argument checks; bench --out."""
import pytest
import torch

from minillm.cli.main import main
from minillm.bench.serve import percentile, run_load, summary
from minillm.model import Transformer, tiny
from minillm.serving import Engine
from minillm.serving.server import ServerThread, build_app


def test_percentile_is_nearest_rank():
    assert percentile([3, 1, 2], 50) == 2 and percentile([1, 2, 3, 4], 99) == 4 and percentile([None], 50) is None


def test_summary_reads_the_burst_rows():
    rows = [dict(server="minillm", mode="one at a time", rate="burst", tok_s=10.0, tpot_p50=0.1, tpot_p99=0.12),
            dict(server="minillm", mode="continuous + chunked prefill", rate="burst", tok_s=35.0, tpot_p50=0.15,
                 tpot_p99=0.2),
            dict(server="llama.cpp", mode="continuous (n_parallel 8)", rate="burst", tok_s=70.0),
            dict(server="minillm", mode="one at a time", rate=1.0, tok_s=99.0, tpot_p50=0.01, tpot_p99=0.01)]
    assert summary(rows) == dict(continuous_vs_serial=3.5, tpot_p99_vs_single=2.0, continuous_vs_llama_cpp=0.5)


@pytest.mark.slow
def test_run_load_over_http_counts_every_token(smollm2):
    _, tok = smollm2
    torch.manual_seed(0)
    engine = Engine(Transformer(tiny(eos_token_id=None)).eval(), tok, max_seqs=4)
    with ServerThread(build_app(engine, model_name="tiny")) as server:
        row = run_load(server.url, "tiny", [[1, 2, 3]] * 6, 5, rate=50.0, clients=3)
    assert row["tokens"] == 30 and row["tok_s"] > 0
    assert 0 < row["ttft_p50"] <= row["ttft_p99"] and 0 <= row["tpot_p50"] <= row["tpot_p99"]
    assert engine.stats["finished"] == 6


@pytest.mark.parametrize("args, message", [(["--rates", "fast"], "--rates"), (["--rates", "0"], "> 0"),
                                           (["--requests", "0"], ">= 1")])
def test_bench_serve_arguments_are_checked(capsys, args, message):
    assert main(["bench", "serve", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [(["kv", "--out", "x.json"], "--out is for bench tree, speculative and serve"),
                                           (["tree", "--out", "/no/such/dir/x.json"], "not a file in an existing directory"),
                                           (["serve", "--out", "/no/such/dir/x.json"], "not a file in an existing directory"),
                                           (["speculative", "--out", "."], "not a file in an existing directory"),
                                           (["speculative", "--repeats", "0"], "--repeats must be at least 1"),
                                           (["stack", "--repeats", "-1"], "--repeats must be at least 1")])
def test_bench_out_and_repeats_are_checked_before_measuring(capsys, args, message):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("what, module", [("tree", "minillm.bench.tree"), ("speculative", "minillm.bench.speculative")])
def test_bench_repeats_reach_the_bench(monkeypatch, what, module):
    import importlib

    seen = {}
    monkeypatch.setattr(importlib.import_module(module), f"bench_{what}", lambda **kw: seen.update(kw))
    assert main(["bench", what, "--repeats", "5"]) in (0, None)
    assert seen["repeats"] == 5
