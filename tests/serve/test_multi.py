"""Several models in one server: NAME=SPEC[+FORMAT] specs, weights shared by the names over one model
(one scheduler, one batch, each name's own template and stops), and models behind other endpoints."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

import tiny
from rtune.errors import RtuneError
from rtune.infer.generate import GenerationConfig, generate_ids
from rtune.serve.app import create_app
from rtune.serve.server import ServerThread
from rtune.serve.specs import EndpointSpec, load_engines, parse_endpoint, parse_model_spec

TIMEOUT = 60
HELLO = [{"role": "user", "content": "Give three tips for staying healthy."}]


def test_model_specs(tmp_path):
    s = parse_model_spec("gemma-3-270m")
    assert (s.name, s.model, s.format) == ("gemma-3-270m", "gemma-3-270m", None)
    s = parse_model_spec("base=gemma-3-270m")
    assert (s.name, s.model, s.format) == ("base", "gemma-3-270m", None)
    s = parse_model_spec("gemma-3-270m+urial-r")
    assert (s.name, s.model, s.format) == ("gemma-3-270m+urial-r", "gemma-3-270m", "urial-r")
    s = parse_model_spec("u=org/model+urial")
    assert (s.name, s.model, s.format) == ("u", "org/model", "urial")
    s = parse_model_spec("zs=runs/rt+zero-shot")
    assert (s.name, s.model, s.format) == ("zs", "runs/rt", "zero-shot")
    s = parse_model_spec("smollm2-135m-instruct+model")
    assert (s.name, s.model, s.format) == ("smollm2-135m-instruct+model", "smollm2-135m-instruct", "model")
    odd = tmp_path / "a=b+urial-r"  # an existing path is taken whole
    odd.mkdir()
    s = parse_model_spec(str(odd))
    assert (s.name, s.model, s.format) == ("a=b+urial-r", str(odd), None)
    s = parse_model_spec(f"x={odd}")
    assert (s.name, s.model, s.format) == ("x", str(odd), None)
    for bad in ["", "=gemma-3-270m", "a b=gemma-3-270m", "base=", "base=+urial"]:
        with pytest.raises(RtuneError):
            parse_model_spec(bad)

    e = parse_endpoint("llama-8b=http://gpu1:8000/v1/")
    assert (e.name, e.url, e.model, e.key_env) == ("llama-8b", "http://gpu1:8000/v1", "llama-8b",
                                                   "RTUNE_ENDPOINT_KEY_LLAMA_8B")
    e = parse_endpoint("big=https://api.example.com/v1#meta-llama/Llama-3.1-8B-Instruct")
    assert (e.url, e.model) == ("https://api.example.com/v1", "meta-llama/Llama-3.1-8B-Instruct")
    for bad in ["big", "big=gpu1:8000", "=http://x", "big=ftp://x"]:
        with pytest.raises(RtuneError):
            parse_endpoint(bad)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    return tiny.tiny_model_dir(root / "one", seed=0), tiny.tiny_model_dir(root / "two", seed=1)


def test_names_over_one_model_share_its_weights_and_scheduler(two_models):
    one, two = two_models
    specs = [parse_model_spec(s) for s in (f"base={one}", f"zs={one}+zero-shot", f"other={two}")]
    engines = load_engines(specs, dtype=torch.float32)
    base, zs, other = engines
    assert base.model is zs.model and base.tokenizer is zs.tokenizer and other.model is not base.model
    assert (base.renderer.template_name, zs.renderer.template_name) == ("tulu", "zero-shot")
    assert zs.renderer.tokenizer is zs.tokenizer  # the template over the loaded tokenizer
    app = create_app(engines)
    served = app.state.models
    assert served["base"].scheduler is served["zs"].scheduler is not served["other"].scheduler
    with pytest.raises(RtuneError):
        load_engines([parse_model_spec(f"m={one}"), parse_model_spec(f"m={two}")])
    with pytest.raises(RtuneError):
        create_app(engines, endpoints=[EndpointSpec("base", "http://127.0.0.1:9/v1", "x")])


def alone(engine, messages, max_new_tokens):
    ids = engine.renderer.render_chat_prompt(messages)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    return generate_ids(engine.model, engine.tokenizer, engine.renderer, [ids], config)[0].text


def test_each_name_answers_in_its_own_template_in_one_shared_batch(two_models, gated_engine_class):
    one, two = two_models
    base, zs, other = load_engines([parse_model_spec(s) for s in (f"base={one}", f"zs={one}+zero-shot",
                                                                   f"other={two}")], dtype=torch.float32)
    # The same engines, with steps a test can hold.
    gated = [gated_engine_class(e.model, e.tokenizer, e.renderer, e.name, spec=e.spec) for e in (base, zs, other)]
    app = create_app(gated, max_tokens=8, batch_wait_ms=0)
    expected = {e.name: alone(e, HELLO, 8) for e in (base, zs, other)}
    assert expected["base"] != expected["zs"]  # the prompts differ: so do the greedy replies
    scheduler = app.state.models["base"].scheduler
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        assert [m.id for m in client.models.list().data] == ["base", "zs", "other"]
        for name in expected:  # one at a time
            reply = client.chat.completions.create(model=name, messages=HELLO, temperature=0, max_tokens=8)
            assert reply.choices[0].message.content == expected[name] and reply.model == name
        cards = {m["id"]: m for m in json.loads(client.models.with_raw_response.list().text)["data"]}
        assert cards["zs"]["rtune_template"] == "zero-shot" and cards["base"]["rtune_template"] == "tulu"
        assert cards["zs"]["rtune_fingerprint"] != cards["base"]["rtune_fingerprint"]  # the template is in it

        # base and zs together: the second joins the first's running batch.
        gate = gated[0]  # the scheduler runs the first engine of the shared weights
        gate.gate.clear()
        entered = gate.entered
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.chat.completions.create, model="base", messages=HELLO, temperature=0,
                                max_tokens=8)
            deadline = time.monotonic() + TIMEOUT
            while gate.entered == entered:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            second = pool.submit(client.chat.completions.create, model="zs", messages=HELLO, temperature=0,
                                 max_tokens=8)
            while scheduler.snapshot()["queued"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            gate.gate.set()
            replies = first.result(TIMEOUT), second.result(TIMEOUT)
        assert [r.choices[0].message.content for r in replies] == [expected["base"], expected["zs"]]
        assert scheduler.snapshot()["step_rows"].get("2", 0) >= 1  # decoded side by side


def test_each_name_stops_at_its_own_templates_stops(two_models):
    one, _ = two_models
    base, zs = load_engines([parse_model_spec(s) for s in (f"base={one}", f"zs={one}+zero-shot")],
                            dtype=torch.float32)
    app = create_app([base, zs], max_tokens=64)
    # The model writes a tulu turn header, then a zero-shot query header: each name stops at its own.
    text = "Eat well.\n<|user|>\nSleep.\n# Query:\nRun."
    ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
    with ServerThread(app) as server, tiny.ScriptedReply(base.model, ids, base.tokenizer.eos_token_id):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        got = {name: client.chat.completions.create(model=name, messages=HELLO, temperature=0, max_tokens=64)
               .choices[0].message.content for name in ("base", "zs")}
    assert got == {"base": "Eat well.", "zs": "Eat well.\n<|user|>\nSleep."}


# -- endpoints ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def far(two_models):
    """Another server (as a vLLM of a larger model would be), which wants its own key."""
    _, two = two_models
    (engine,) = load_engines([parse_model_spec(f"far-model={two}")], dtype=torch.float32)
    with ServerThread(create_app(engine, api_key="far-secret", max_tokens=8)) as server:
        yield server


def test_endpoint_models_are_proxied_with_their_own_key(far, two_models, monkeypatch):
    one, _ = two_models
    (near,) = load_engines([parse_model_spec(f"near={one}")], dtype=torch.float32)
    spec = parse_endpoint(f"big={far.url}/v1#far-model")
    monkeypatch.setenv(spec.key_env, "far-secret")
    app = create_app(near, api_key="near-key", max_tokens=8, endpoints=[spec])
    direct = openai.OpenAI(base_url=far.url + "/v1", api_key="far-secret", max_retries=0, timeout=TIMEOUT)
    want = direct.chat.completions.create(model="far-model", messages=HELLO, temperature=0, max_tokens=8)
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="near-key", max_retries=0, timeout=TIMEOUT)
        listed = client.models.with_raw_response.list().text
        assert [m["id"] for m in json.loads(listed)["data"]] == ["near", "big"]
        assert far.url not in listed and "far-secret" not in listed
        assert client.models.retrieve("big").owned_by == "endpoint"
        reply = client.chat.completions.create(model="big", messages=HELLO, temperature=0, max_tokens=8)
        assert reply.choices[0].message.content == want.choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="big", messages=HELLO, temperature=0, max_tokens=8, stream=True) if c.choices)
        assert streamed == want.choices[0].message.content
        done = client.completions.create(model="big", prompt="The quick brown", temperature=0, max_tokens=4)
        assert done.choices[0].text == direct.completions.create(model="far-model", prompt="The quick brown",
                                                                 temperature=0, max_tokens=4).choices[0].text
        # The upstream's errors come back in their shape; the near key is still asked for.
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="big", messages=[], max_tokens=8)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="far-secret", max_retries=0).chat.completions.create(
                model="big", messages=HELLO, max_tokens=2)


def test_an_endpoint_never_gets_the_clients_key_and_errors_name_no_url(far, monkeypatch):
    spec = parse_endpoint(f"big={far.url}/v1#far-model")
    monkeypatch.delenv(spec.key_env, raising=False)
    down = parse_endpoint("gone=http://user:pw@127.0.0.1:9/v1")
    with ServerThread(create_app(endpoints=[spec, down])) as server:
        # The client sends the far server's key to this (keyless) server: it is not passed on.
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="far-secret", max_retries=0, timeout=TIMEOUT)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="big", messages=HELLO, max_tokens=2)
        assert e.value.status_code == 502 and e.value.body["code"] == "endpoint_auth"
        assert spec.key_env in e.value.message and far.url not in e.value.message
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="gone", messages=HELLO, max_tokens=2)
        assert e.value.status_code == 502 and e.value.body["code"] == "endpoint_unreachable"
        assert "127.0.0.1:9" not in e.value.message and "pw" not in e.value.message
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nobody", messages=HELLO, max_tokens=2)
