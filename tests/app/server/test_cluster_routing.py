"""The parts of `llmapp serve --ray` that need no Ray: prefix keys, the prefix index, the
routing decision, the configuration, deployment metrics, and the CLI's refusals."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmapp.app.cli import main
from llmapp.app.server.app import ServerConfig
from llmapp.app.server.cluster import (
    INSTALL_HINT,
    ClusterConfig,
    ModelView,
    PrefixIndex,
    RoutePolicy,
    cluster_metrics_text,
    decide,
    deployment_name,
    json_object,
    parse_autoscale,
    prefix_keys,
    routing_ids,
)
from llmapp.app.server.pool import PoolConfig
from llmapp.runtime.core.kv_cache import KVCacheManager, SequenceBlocks


def keys(*names: str) -> tuple[bytes, ...]:
    """Stand-in chained keys: block i of prompt 'ab' is b'a' then b'ab'."""
    return tuple(name.encode() for name in names)


# ---- prefix keys are the engine's keys ----------------------------------------------------


def test_prefix_keys_are_the_keys_the_engine_publishes() -> None:
    ids = [random.Random(7).randrange(49152) for _ in range(16 * 5 + 9)]
    kv = KVCacheManager(num_blocks=16, block_size=16)
    seq = SequenceBlocks()
    kv.allocate(seq, len(ids))
    kv.publish_full_blocks(seq, ids, len(ids))
    assert list(prefix_keys(ids, max_blocks=100)) == seq.keys  # full blocks only: 5
    assert prefix_keys(ids, max_blocks=3) == tuple(seq.keys[:3])
    assert prefix_keys(ids[:15], max_blocks=3) == ()


def test_prefix_keys_chain_the_whole_prefix() -> None:
    a = list(range(32))
    b = list(range(16)) + [99] * 16
    c = [5] + list(range(1, 32))
    assert prefix_keys(a, 2)[0] == prefix_keys(b, 2)[0]
    assert prefix_keys(a, 2)[1] != prefix_keys(b, 2)[1]
    assert prefix_keys(a, 2)[1] != prefix_keys(c, 2)[1]  # same second block, other first


# ---- the index ----------------------------------------------------------------------------


def test_index_matches_the_deepest_block_a_live_replica_holds() -> None:
    index = PrefixIndex()
    index.record(keys("a", "ab", "abc"), "r1")
    index.record(keys("a", "ax"), "r2")
    assert index.match(keys("a", "ab", "abc", "abcd"), {"r1", "r2"}) == (3, ["r1"])
    assert index.match(keys("a", "ax", "axy"), {"r1", "r2"}) == (2, ["r2"])
    depth, holders = index.match(keys("a", "az"), {"r1", "r2"})
    assert depth == 1 and sorted(holders) == ["r1", "r2"]
    assert index.match(keys("a", "ab", "abc"), {"r2"}) == (1, ["r2"])  # r1 is gone
    assert index.match(keys("z"), {"r1", "r2"}) == (0, [])


def test_index_forgets_a_replica_and_stays_bounded() -> None:
    index = PrefixIndex(max_keys=4)
    index.record(keys("a", "ab"), "r1")
    index.record(keys("a", "ac"), "r2")
    index.forget("r1")
    assert index.match(keys("a", "ab"), {"r1", "r2"}) == (1, ["r2"])
    for i in range(10):
        index.record(keys(f"k{i}"), "r2")
    assert len(index) == 4
    assert index.match(keys("k9"), {"r2"}) == (1, ["r2"])
    assert index.match(keys("a"), {"r2"}) == (0, [])  # least recently used went first


# ---- the decision -------------------------------------------------------------------------


def test_decide_sends_a_known_prefix_to_its_replica() -> None:
    index = PrefixIndex()
    conversation = keys(*[f"c{i}" for i in range(1, 9)])
    index.record(conversation, "r1")
    policy = RoutePolicy(capacity=16, busy_margin=4)
    rng = random.Random(0)
    assert decide(conversation, index, {"r1": 3, "r2": 0}, policy, rng) == ("r1", "prefix")
    # Four more than the least loaded is busy: the request goes where there is room.
    assert decide(conversation, index, {"r1": 4, "r2": 0}, policy, rng) == ("r2", "fallback_busy")
    # A full batch is busy whatever the others carry.
    assert decide(conversation, index, {"r1": 16, "r2": 16}, policy, rng) == (
        "r2",
        "fallback_busy",
    )


def test_decide_weighs_a_short_shared_prefix_lightly() -> None:
    """A system prompt every request shares must not pile requests onto one replica."""
    index = PrefixIndex()
    index.record(keys("sys"), "r1")
    policy = RoutePolicy(capacity=16, busy_margin=4)
    rng = random.Random(0)
    assert decide(keys("sys", "q1"), index, {"r1": 0, "r2": 0}, policy, rng) == ("r1", "prefix")
    assert decide(keys("sys", "q2"), index, {"r1": 1, "r2": 0}, policy, rng) == (
        "r2",
        "fallback_busy",
    )


def test_decide_spreads_new_prompts_over_the_least_loaded() -> None:
    index = PrefixIndex()
    policy = RoutePolicy()
    rng = random.Random(0)
    assert decide(keys("new"), index, {"r1": 2, "r2": 1, "r3": 1}, policy, rng)[1] == (
        "fallback_miss"
    )
    seen = {decide((), index, {"r1": 0, "r2": 0}, policy, rng)[0] for _ in range(50)}
    assert seen == {"r1", "r2"}  # ties are broken at random
    with pytest.raises(ValueError):
        decide((), index, {}, policy, rng)


def test_policy_for_capacity() -> None:
    assert RoutePolicy.for_capacity(16) == RoutePolicy(capacity=16, busy_margin=4)
    assert RoutePolicy.for_capacity(1).busy_margin == 2
    with pytest.raises(ValueError):
        RoutePolicy(capacity=0)


# ---- prompts as the engine encodes them ---------------------------------------------------


@pytest.fixture(scope="module")
def smol_text(smollm2_path: Path) -> SimpleNamespace:
    from llmapp.runtime.files.gguf_file import GGUFFile
    from llmapp.runtime.text.chat_template import ChatTemplate
    from llmapp.runtime.text.tokenizer import Tokenizer

    with GGUFFile(smollm2_path) as gguf:
        return SimpleNamespace(
            tokenizer=Tokenizer.from_gguf(gguf), template=ChatTemplate.from_gguf(gguf)
        )


@pytest.mark.real_model
def test_routing_ids_are_the_engines_prompt_ids(smol_text: SimpleNamespace) -> None:
    from llmapp.runtime.core.engine import Engine

    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Name "},
                                     {"type": "text", "text": "a colour."}]},
    ]  # fmt: skip
    engine_messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
    ]
    tok, tpl = smol_text.tokenizer, smol_text.template
    expected = Engine.encode_prompt(smol_text, engine_messages)  # type: ignore[arg-type]
    assert routing_ids({"messages": messages}, tok, tpl, limit=512) == expected
    text = "Once upon a time, "
    assert routing_ids({"prompt": text}, tok, tpl, 512) == Engine.encode_prompt(smol_text, text)  # type: ignore[arg-type]
    assert routing_ids({"prompt": [text, "other"]}, tok, tpl, 512) == tok.encode(text)
    assert routing_ids({"prompt": [1, 2, 3]}, tok, tpl, 512) == [1, 2, 3]
    assert routing_ids({"prompt": 7}, tok, tpl, 512) == []


@pytest.mark.real_model
def test_routing_ids_of_a_long_text_keep_an_exact_head(smol_text: SimpleNamespace) -> None:
    tok = smol_text.tokenizer
    text = "The lighthouse keeper counted ships, gulls and storms. " * 200  # 11 000 characters
    full = tok.encode(text)
    head = routing_ids({"prompt": text}, tok, smol_text.template, limit=16)
    assert 16 <= len(head) < len(full)
    assert head == full[: len(head)]


def test_json_object_tolerates_any_body() -> None:
    assert json_object(b'{"model": "m"}') == {"model": "m"}
    assert json_object(b"[1, 2]") == {}
    assert json_object(b"\xff{") == {}
    assert json_object(b"") == {}


# ---- configuration ------------------------------------------------------------------------


def config(**kw: object) -> ClusterConfig:
    server = ServerConfig(pool=PoolConfig(default_model="smollm2:135m", max_num_seqs=8))
    return ClusterConfig(server=server, **kw)  # type: ignore[arg-type]


def test_cluster_config_checks_itself() -> None:
    assert config(replicas=3).min_replicas == 3 == config(replicas=3).max_replicas
    scaled = config(autoscale=(0, 4))
    assert (scaled.min_replicas, scaled.max_replicas, scaled.capacity) == (0, 4, 8)
    for bad in ({"replicas": 0}, {"autoscale": (3, 2)}, {"autoscale": (0, 0)},
                {"replica_cpus": 0}, {"routing": "fastest"}, {"prefix_blocks": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            config(**bad)


def test_parse_autoscale_and_names() -> None:
    assert parse_autoscale("1:4") == (1, 4)
    assert parse_autoscale(" 0 : 2 ") == (0, 2)
    for bad in ("4", "1-4", "a:b", "-1:2"):
        with pytest.raises(ValueError):
            parse_autoscale(bad)
    assert deployment_name("smollm2:135m") == "engine-smollm2-135m"
    assert deployment_name("hf.co/x/y#z") == "engine-hf.co-x-y-z"


# ---- metrics of a whole deployment --------------------------------------------------------


def snapshot(running: int, hits: int) -> dict[str, object]:
    """An engine's metrics snapshot, as a replica reports it."""
    from llmapp.runtime.core.metrics import EngineMetrics

    prefix = {"queries": 1, "query_tokens": 100, "hit_tokens": hits, "cached_blocks": 4}
    snap = EngineMetrics().snapshot(running=running, waiting=0, kv_usage=0.1, prefix=prefix)
    snap["finished_by_reason"] = {"stop": 2}
    return snap


def test_cluster_metrics_label_each_replica() -> None:
    view = ModelView(
        "smollm2:135m",
        replicas={
            "r1": {"models": [{"snapshot": snapshot(2, 64)}]},
            "r2": {"models": [{"snapshot": snapshot(1, 0)}]},
        },
        routes={"prefix": 5, "fallback_miss": 2},
    )
    text = cluster_metrics_text([view])[0].decode()
    assert 'llmapp:num_requests_running{model_name="smollm2:135m",replica="r1"} 2.0' in text
    assert 'llmapp:prefix_cache_hits_total{model_name="smollm2:135m",replica="r2"} 0.0' in text
    assert (
        'llmapp:request_success_total{finished_reason="stop",model_name="smollm2:135m",'
        'replica="r1"} 2.0'
    ) in text
    assert 'llmapp:cluster_replicas{model_name="smollm2:135m"} 2.0' in text
    assert 'llmapp:cluster_routed_requests_total{model_name="smollm2:135m",route="prefix"} 5.0' in (
        text
    )
    assert 'route="fallback_busy"} 0.0' in text
    empty = cluster_metrics_text([ModelView("m")])[0].decode()
    assert 'llmapp:cluster_replicas{model_name="m"} 0.0' in empty


# ---- the command line ---------------------------------------------------------------------


def test_ray_options_need_ray(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "smollm2:135m", "--replicas", "2"]) == 1
    assert capsys.readouterr().err.strip() == "llmapp: error: --replicas needs --ray"


def test_ray_missing_says_how_to_install_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RAY_USAGE_STATS_ENABLED", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    for module in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    assert main(["serve", "smollm2:135m", "--ray", "--port", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"llmapp: error: {INSTALL_HINT}"]


def test_bad_autoscale_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "smollm2:135m", "--ray", "--autoscale", "4:1", "--port", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["llmapp: error: --autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1"]
