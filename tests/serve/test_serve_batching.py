"""Continuous batching: requests with different settings share the running batch, join as others
finish, and each gets exactly what generating it alone gives (fp32); incremental text matching."""

import asyncio
import random
import time

import openai
import pytest
import torch
from conftest import TIMEOUT, gemma3_model

import tiny
from rtune.infer.generate import GenerationConfig, generate_ids
from rtune.render import Renderer
from rtune.serve.app import create_app
from rtune.serve.engine import Engine, _EndIdsOnly
from rtune.serve.server import ServerThread
from rtune.serve.text import ReplyText, held_back

PROMPTS = ["The quick brown fox", "Give three tips for staying healthy.", "1. First\n2. Second", "Héllo wörld",
           "emoji 🙂 and tabs", "naïve café", "sleep and exercise", "jumps over the lazy dog", "Eat well, sleep",
           "東京", "The lazy dog", "Third"]


def _model(kind: str):
    tok = tiny.byte_bpe_tokenizer()
    renderer = Renderer(tok)  # tulu: its next-turn headers are stop strings
    if kind == "llama":
        from transformers import AutoModelForCausalLM

        path = tiny.tiny_model_dir(tiny_dir(), tokenizer=tok)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    elif kind == "gpt2":  # learned absolute positions: a wrong position id changes its outputs
        model = tiny.tiny_gpt2(tok)
    elif kind == "lora":  # a PEFT model, as a LoRA run is served (random adapter weights: they change outputs)
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        path = tiny.tiny_model_dir(tiny_dir(), tokenizer=tok)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        torch.manual_seed(1)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(base, config).eval()
    else:  # sliding-window layers of 6 tokens: prompts and replies are longer than the window
        model = gemma3_model(tok)
    return model, tok, renderer


def tiny_dir():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="rtune-serve-llama-"))


def _requests(model, tok, renderer):
    """A mix of requests and what each gives alone: (kind, body, expected text, finish_reason, tokens)."""
    out = []
    for i, text in enumerate(PROMPTS):
        messages = [{"role": "user", "content": text}]
        prompt = renderer.render_chat_prompt(messages)
        body = {"model": "m", "messages": messages, "temperature": 0, "max_tokens": [1, 5, 17, 40][i % 4]}
        config = GenerationConfig(max_new_tokens=body["max_tokens"])
        stops = renderer
        kind = "chat"
        if i % 6 == 1:  # a stop string from the middle of its own greedy reply
            whole = generate_ids(model, tok, renderer, [prompt], GenerationConfig(max_new_tokens=40))[0].text
            cut = next((k for k in range(3, len(whole) - 2) if whole[k : k + 2].isalnum()), None)
            if cut is not None:
                body.update(max_tokens=40, stop=[whole[cut : cut + 2], "zzzz"])
                config = GenerationConfig(max_new_tokens=40, stop=body["stop"])
        elif i % 6 == 2:  # a seeded sample
            body.update(temperature=0.9, top_p=0.9, top_k=20, seed=100 + i)
            config = GenerationConfig(max_new_tokens=body["max_tokens"], do_sample=True, temperature=0.9, top_p=0.9,
                                      top_k=20, seed=100 + i)
        elif i % 6 == 3:
            body.update(repetition_penalty=1.3)
            config = GenerationConfig(max_new_tokens=body["max_tokens"], repetition_penalty=1.3)
        elif i % 6 == 4:  # a raw completion that ends at one of its own tokens (stop_token_ids)
            prompt = list(tok(text)["input_ids"])
            first = generate_ids(model, tok, _EndIdsOnly(renderer.stop_ids), [prompt],
                                 GenerationConfig(max_new_tokens=40))[0].token_ids
            body = {"model": "m", "prompt": prompt, "temperature": 0, "max_tokens": 40,
                    "stop_token_ids": first[3:4]}
            config = GenerationConfig(max_new_tokens=40)
            stops = _EndIdsOnly(list(renderer.stop_ids) + first[3:4])
            kind = "completion"
        elif i % 6 == 5:
            kind = "stream"
        gen = generate_ids(model, tok, stops, [prompt], config)[0]
        reason = "length" if gen.finish_reason == "length" else "stop"
        out.append((kind, body, gen.text, reason, gen.num_tokens + (gen.stop_id is not None)))
    return out


EXTRA = ("top_k", "repetition_penalty", "stop_token_ids")  # vLLM's fields: the SDK sends them as extra_body


async def _send(client, kind, body):
    """(text, finish_reason, completion tokens) of one request."""
    extra = {k: body[k] for k in EXTRA if k in body}
    body = {**{k: v for k, v in body.items() if k not in EXTRA}, "extra_body": extra}
    if kind == "completion":
        r = await client.completions.create(**body)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
    if kind == "stream":
        text, reason, tokens = "", None, None
        chunks = await client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
        async for c in chunks:
            if c.choices:
                text += c.choices[0].delta.content or ""
                reason = c.choices[0].finish_reason or reason
            if c.usage:
                tokens = c.usage.completion_tokens
        return text, reason, tokens
    r = await client.chat.completions.create(**body)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3", "lora"])
def test_mixed_requests_share_the_batch_and_answer_as_alone(kind):
    model, tok, renderer = _model(kind)
    requests = _requests(model, tok, renderer)
    engine = Engine(model, tok, renderer, "m")
    app = create_app(engine, max_batch_size=4, batch_wait_ms=0, max_queue=32)
    scheduler = app.state.models["m"].scheduler

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        try:
            return await asyncio.wait_for(asyncio.gather(*(_send(client, k, b) for k, b, *_ in requests)), TIMEOUT)
        finally:
            await client.close()

    with ServerThread(app) as server:
        got = asyncio.run(all_at_once())
    for (k, body, text, reason, tokens), answer in zip(requests, got):
        assert answer == (text, reason, tokens), (k, body)
    # Twelve requests, at most four rows: later ones joined a running batch, and steps mixed settings.
    stats = scheduler.snapshot()
    assert stats["joined_running"] >= 1 and stats["mixed_steps"] >= 1, stats
    assert max(int(n) for n in stats["step_rows"]) == 4 and stats["finished"] == len(requests)


def test_a_stream_shares_steps_with_other_requests(tiny_model_path):
    from rtune.infer.load import load_for_inference

    model, tok, renderer = load_for_inference(str(tiny_model_path), dtype=torch.float32, device="cpu")
    engine = Engine(model, tok, renderer, "m")
    app = create_app(engine, max_batch_size=8, batch_wait_ms=50)
    scheduler = app.state.models["m"].scheduler
    body = {"model": "m", "messages": [{"role": "user", "content": "Give three tips"}], "temperature": 0,
            "max_tokens": 30}

    async def together():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        try:
            return await asyncio.gather(_send(client, "stream", body), _send(client, "stream", body),
                                        _send(client, "chat", body), _send(client, "chat", body))
        finally:
            await client.close()

    with ServerThread(app) as server:
        got = asyncio.run(together())
    assert len(set(got)) == 1  # streamed or not: the same reply
    assert max(int(n) for n in scheduler.snapshot()["step_rows"]) == 4  # the two streams stepped with the rest


# -- matching stop strings on incrementally decoded text ---------------------------------------------
@pytest.mark.parametrize("make", [tiny.byte_bpe_tokenizer, tiny.metaspace_tokenizer])
def test_incremental_text_is_the_whole_decode(make):
    tok = make()
    rng = random.Random(0)
    special = set(tok.all_special_ids)
    ids_pool = [i for i in range(len(tok)) if i not in special]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    for _ in range(20):
        ids: list[int] = []
        follow = ReplyText(decode, ())
        for _ in range(40):
            ids.append(rng.choice(ids_pool))
            follow.add(ids)
            whole = decode(ids)
            assert whole.startswith(follow.text)
            if not whole.endswith("\ufffd"):
                assert follow.text == whole


def test_stop_strings_are_found_where_they_complete():
    tok = tiny.byte_bpe_tokenizer()
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    ids = list(tok("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"])
    follow = ReplyText(decode, ("lazy", "fox j"))
    for n in range(1, len(ids) + 1):
        follow.add(ids[:n])
        if follow.stop_at is not None:
            break
    assert decode(ids[:n]).find("fox j") == follow.stop_at == len("The quick brown ")
    assert not decode(ids[: n - 1]).count("fox j")  # found at the first id that completes it
    assert follow.showable() == len("The quick brown")  # the space before a stop string is cut too


@pytest.mark.parametrize("text, strings, backticks, held", [
    ("Hello <|us", ("<|user|>",), False, 5),  # "<|us" may begin the stop string, and the space before it
    ("Hello <|user|", ("<|user|>",), False, 8),
    ("Hello world", ("<|user|>",), False, 0),
    ("Hello world \n", ("<|user|>",), False, 2),  # whitespace that a cut would remove
    ("Hello\n``", (), True, 3),  # a fence the in-context cleanup may strip
    ("Hello\n``", (), False, 0),  # nothing can cut it
    ("ab" * 30 + "a", ("ab" * 40,), False, 61),  # long repeated prefixes: the longest wins
])  # fmt: skip
def test_what_a_stream_holds_back(text, strings, backticks, held):
    assert held_back(text, strings, backticks) == held


def test_a_long_prompt_is_fed_in_chunks_between_the_running_rows_steps(tiny_model_path, monkeypatch):
    """A long prompt holds the running rows for one chunk at a time, and its reply is unchanged."""
    import rtune.serve.scheduler as scheduler_module
    from rtune.infer.load import load_for_inference

    monkeypatch.setattr(scheduler_module, "PREFILL_CHUNK_TOKENS", 16)
    model, tok, renderer = load_for_inference(str(tiny_model_path), dtype=torch.float32, device="cpu")
    engine = Engine(model, tok, renderer, "m")
    shapes = []
    forward = engine.forward
    engine.forward = lambda ids, *rest: shapes.append(tuple(ids.shape)) or forward(ids, *rest)
    long_text = " ".join(PROMPTS * 4)
    long_prompt = renderer.render_chat_prompt([{"role": "user", "content": long_text}])
    assert len(long_prompt) > 10 * 16
    expected = generate_ids(model, tok, renderer, [long_prompt], GenerationConfig(max_new_tokens=8))[0].text
    app = create_app(engine, batch_wait_ms=0)
    running = {"model": "m", "messages": [{"role": "user", "content": "Give three tips"}], "temperature": 0,
               "max_tokens": 300}

    async def beside():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        try:
            first = asyncio.create_task(_send(client, "stream", running))
            while not any(s == (1, 1) for s in shapes):  # the stream is stepping
                await asyncio.sleep(0.005)
            body = {"model": "m", "messages": [{"role": "user", "content": long_text}], "temperature": 0,
                    "max_tokens": 8}
            return await _send(client, "chat", body), await first
        finally:
            await client.close()

    with ServerThread(app) as server:
        (text, _, _), _ = asyncio.run(beside())
    assert text == expected
    chunks = [i for i, s in enumerate(shapes) if s == (1, 16)]
    assert len(chunks) >= 10
    steps_between = [s for s in shapes[chunks[0] : chunks[-1]] if s[1] == 1]
    assert len(steps_between) >= len(chunks) - 1  # a decode step of the stream between every two chunks


def test_bf16_on_the_cpu_batches_mixed_requests(tiny_model_path):
    """bf16 weights (the KV cache, its padding and the logits in bf16; tokens chosen in fp32)."""
    from rtune.infer.load import load_for_inference

    model, tok, renderer = load_for_inference(str(tiny_model_path), dtype=torch.bfloat16, device="cpu")
    engine = Engine(model, tok, renderer, "m")
    app = create_app(engine, max_batch_size=3, batch_wait_ms=0)
    bodies = [{"model": "m", "messages": [{"role": "user", "content": p}], "temperature": t, "max_tokens": n, "seed": 1}
              for p, t, n in zip(PROMPTS, [0, 0.7, 0, 1.0, 0], [3, 20, 9, 30, 12])]

    async def together():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        try:
            return await asyncio.gather(*(_send(client, "chat", b) for b in bodies))
        finally:
            await client.close()

    with ServerThread(app) as server:
        got = asyncio.run(together())
        card = openai.OpenAI(base_url=server.url + "/v1", api_key="none").models.list().data[0]
    assert card.dtype == "bf16"
    for body, (_, reason, tokens) in zip(bodies, got):
        assert tokens <= body["max_tokens"] + 1 and reason in ("stop", "length")
    stats = app.state.models["m"].scheduler.snapshot()
    assert stats["finished"] == len(bodies) and stats["joined_running"] >= 1 and stats["mixed_steps"] >= 1


def test_one_token_requests_take_no_row_of_the_batch(endless_model_path, gated_engine_class):
    """A judge's max_tokens-1 requests end at their prefill: they join the prefill group even when the
    running batch is full."""
    from rtune.infer.load import load_for_inference

    model, tok, renderer = load_for_inference(str(endless_model_path), dtype=torch.float32, device="cpu")
    engine = gated_engine_class(model, tok, renderer, "m")
    shapes = []
    forward = gated_engine_class.forward
    engine.forward = lambda ids, *rest: shapes.append(tuple(ids.shape)) or forward(engine, ids, *rest)
    app = create_app(engine, max_batch_size=2, batch_wait_ms=0)
    scheduler = app.state.models["m"].scheduler

    def body(p, n):
        return {"model": "m", "messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": n}

    async def together():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        try:
            deadline = time.monotonic() + TIMEOUT
            long = [asyncio.create_task(_send(client, "chat", body(p, 2000))) for p in PROMPTS[:2]]
            while scheduler.running < 2:  # both rows taken (their replies never end before 2000 tokens)
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            engine.gate.clear()
            while not engine.held:  # the model waits at the gate: the short ones cannot be taken yet
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            short = [asyncio.create_task(_send(client, "chat", body(p, 1))) for p in PROMPTS[2:8]]
            while scheduler.queued < 6:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            shapes.clear()
            engine.gate.set()
            answers = await asyncio.gather(*short)
            assert scheduler.running == 2  # answered while both rows stayed taken
            scheduler.cancel([r.job for r in scheduler._rows])  # the long ones are not needed any more
            for task in long:
                task.cancel()
            return answers
        finally:
            engine.gate.set()
            await client.close()

    with ServerThread(app) as server:
        got = asyncio.run(together())
    assert [tokens for _, _, tokens in got] == [1] * 6
    assert [s[0] for s in shapes if s[1] > 1] == [2, 2, 2]  # prefill groups of at most max_batch_size
