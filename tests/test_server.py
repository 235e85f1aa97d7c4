"""The HTTP server: concurrent streams under a plan change, errors, overload, metrics."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch

from runtime.control import OperatorPlan, Plan
from runtime.engine import Engine, EngineConfig
from runtime.kvcache import KVLayout
from runtime.model import build_model, generate_split
from runtime.models import OPERATOR_GROUPS, get_model
from runtime.server import ByteTokenizer, ServerThread, create_app

TINY = get_model("tiny")


@pytest.fixture(scope="module")
def model():
    return build_model(TINY, dtype=torch.float64, seed=2)


@pytest.fixture
def served(model):
    plan = Plan({g: OperatorPlan(2, 8, "pack") for g in OPERATOR_GROUPS})
    eng = Engine(model, plan).start()
    srv = ServerThread(create_app(eng)).start()
    yield eng, srv
    srv.stop()
    eng.stop()


async def _stream(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> list[dict]:
    events = []
    async with client.stream("POST", "/v1/completions",
                             json={"prompt": prompt, "max_tokens": max_tokens, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    return events


def test_64_streams_survive_plan_change(served, model):
    eng, srv = served
    n, max_tokens = 64, 12
    ps = [[(5 * i + 3 * j) % 256 for j in range(2 + i % 11)] for i in range(n)]
    refs = [generate_split(model, p, max_tokens) for p in ps]
    assert srv.url.startswith("http://127.0.0.1:")

    async def main():
        limits = httpx.Limits(max_connections=n + 4)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as c:
            tasks = [asyncio.create_task(_stream(c, p, max_tokens)) for p in ps]
            while eng.metrics.ttft._sum.get() == 0:  # first tokens are out: load is running
                await asyncio.sleep(0.005)
            r = await c.post("/v1/plan", json={"mlp": {"replicas": 3}, "proj": {"replicas": 1},
                                               "attn": {"placement": "dedicated"}})
            assert r.status_code == 200, r.text
            return await asyncio.gather(*tasks), r.json()

    results, applied = asyncio.run(main())
    assert applied["plan"]["mlp"]["replicas"] == 3 and applied["plan"]["attn"]["placement"] == "dedicated"
    for events, ref in zip(results, refs):
        assert events[-1] == "[DONE]"
        toks = [json.loads(e)["choices"][0] for e in events[:-1]]
        body = [t for t in toks if t["finish_reason"] is None]
        assert [t["token_index"] for t in body] == list(range(max_tokens))  # none lost, none twice
        assert [t["token_id"] for t in body] == ref
        assert toks[-1]["finish_reason"] == "length"
    eng.wait_ready(30)
    assert len(eng.replicas["mlp"]) == 3 and len(eng.replicas["proj"]) == 1
    assert all(r.slot.startswith("d:attn") for r in eng.replicas["attn"])


def test_non_streaming_text_prompt(served, model):
    _, srv = served
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "héllo", "max_tokens": 5})
    assert r.status_code == 200
    body = r.json()
    ids = list("héllo".encode())
    assert body["choices"][0]["token_ids"] == generate_split(model, ids, 5)
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}


@pytest.mark.parametrize("payload,status,needle", [
    ({"max_tokens": 3}, 400, "prompt: Field required"),
    ({"prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": [1, 2], "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": [1, -4], "max_tokens": 2}, 400, "out of range"),
    ({"prompt": [], "max_tokens": 2}, 400, "prompt is empty"),
    ({"prompt": [1], "max_tokens": 2, "temperature": -1}, 400, "temperature"),
    ({"prompt": [1] * 510, "max_tokens": 9}, 400, "exceeds the model's context of 512"),
])
def test_malformed_requests_get_4xx_with_reason(served, payload, status, needle):
    _, srv = served
    r = httpx.post(srv.url + "/v1/completions", json=payload)
    assert r.status_code == status
    assert needle in r.json()["error"]["message"]


def test_bad_json_and_bad_plan(served):
    eng, srv = served
    r = httpx.post(srv.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(srv.url + "/v1/plan", json={"gpu": {"replicas": 1, "max_batch": 1}})
    assert r.status_code == 400 and "unknown operator groups ['gpu']" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/plan", json={"mlp": {"replicas": 0}})
    assert r.status_code == 400 and "at least one replica" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/plan", json={"mlp": {"placement": "moon"}})
    assert r.status_code == 400 and "placement must be one of" in r.json()["error"]["message"]
    assert eng.plan["mlp"].replicas == 2  # nothing applied


def test_metrics_expose_per_operator_series(served):
    _, srv = served
    httpx.post(srv.url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3})
    text = httpx.get(srv.url + "/metrics").text
    for g in OPERATOR_GROUPS:
        assert f'opscale_operator_queue_tokens{{group="{g}"}}' in text
        assert f'opscale_operator_max_batch{{group="{g}"}} 8.0' in text
        assert f'opscale_operator_replicas{{group="{g}",state="ready"}} 2.0' in text
        assert f'opscale_operator_latency_seconds_count{{group="{g}"}}' in text
        assert f'opscale_operator_batch_last{{group="{g}"}}' in text
    assert "opscale_ttft_seconds_bucket" in text and "opscale_tbt_seconds_bucket" in text
    assert 'opscale_requests_total{outcome="completed"} 1.0' in text


def test_overload_gets_429_then_503_when_stopped(model):
    lay = KVLayout(TINY.n_layers, TINY.n_kv_heads, TINY.head_dim, 16, torch.float64)
    eng = Engine(model, Plan.model_level(1, 4, 1),
                 EngineConfig(kv_bytes_per_replica=lay.bytes_per_block, max_waiting=1)).start()
    srv = ServerThread(create_app(eng)).start()
    # the first request's steps wait at the sampler until the 429 is checked: it cannot
    # finish (and free the only KV block) first, however fast the engine is
    gate = threading.Event()
    sampler = eng.replicas["head"][0].modules["sampler"]

    class GatedSampler(torch.nn.Module):
        def forward(self, *args, **kwargs):
            gate.wait(30)
            return sampler(*args, **kwargs)

    eng.replicas["head"][0].modules["sampler"] = GatedSampler()
    try:
        held = [eng.submit([1, 2], 14)]
        while held[0].attn is None:  # admitted: it holds the only KV block
            time.sleep(0.001)
        held.append(eng.submit([3, 4], 14))  # waits for KV
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": [1], "max_tokens": 2})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert "already wait for KV memory" in r.json()["error"]["message"]
        gate.set()
        for s in held:
            s.finished.wait(30)
        assert httpx.get(srv.url + "/healthz").status_code == 200
        eng.stop()
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": [1], "max_tokens": 2})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert httpx.get(srv.url + "/healthz").status_code == 503
    finally:
        gate.set()
        srv.stop()
        eng.stop()


def test_byte_tokenizer_roundtrip_and_small_vocab():
    tok = ByteTokenizer(300)
    assert tok.encode("aé") == [97, 195, 169]
    assert tok.decode([97, 195, 169, 299]) == "aé"
    with pytest.raises(ValueError, match="at least 256"):
        ByteTokenizer(100)


def test_serve_cli_refuses_bad_arguments(tmp_path):
    from runtime.serve import build_parser, initial_plan, main

    with pytest.raises(SystemExit, match="not a loopback address; add --allow-remote"):
        main(["--model", "tiny", "--host", "0.0.0.0"])
    with pytest.raises(SystemExit, match="unknown model 'nope'"):
        main(["--model", "nope"])
    with pytest.raises(SystemExit, match="--controller ppo needs --checkpoint"):
        main(["--model", "tiny", "--controller", "ppo"])
    with pytest.raises(SystemExit, match="--budget needs --controller"):
        main(["--model", "tiny", "--budget", "4"])
    with pytest.raises(SystemExit, match="--budget must be >= 1 placement slot, got 0"):
        main(["--model", "tiny", "--controller", "static", "--budget", "0"])
    with pytest.raises(SystemExit, match="--micro-batches must be >= 1, got 0"):
        main(["--model", "tiny", "--micro-batches", "0"])
    a = build_parser().parse_args(["--model", "tiny", "--kv-allocation", "reserve", "--micro-batching", "fixed"])
    assert (a.kv_allocation, a.micro_batches, a.micro_batching) == ("reserve", 2, "fixed")
    args = build_parser().parse_args(["--model", "tiny", "--plan", '{"mlp": {"replicas": 1, "max_batch": 4}}'])
    with pytest.raises(SystemExit, match=r"--plan: plan lacks operator groups \['attn', 'embed', 'head', 'proj'\]"):
        initial_plan(args)
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(Plan.model_level(2, 16, 1).to_dict()))
    plan = initial_plan(build_parser().parse_args(["--model", "tiny", "--plan", str(f)]))
    assert plan == Plan.model_level(2, 16, 1)
    assert initial_plan(build_parser().parse_args(["--model", "tiny", "--replicas", "3"])) == Plan.model_level(3, 32, 1)


def test_serve_budget_fill_choices_are_the_agents_rules():
    from agents.budget import FILL_RULES
    from runtime.serve import build_parser

    action = next(a for a in build_parser()._actions if a.dest == "budget_fill")
    assert set(action.choices) == set(FILL_RULES)
