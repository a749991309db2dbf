"""Generation by running OpenAI-compatible servers: `rtune serve`, `vllm serve`, SGLang, TGI, llama.cpp.

MODEL (here) gives the tokenizer and the template; the servers give the weights. Each prompt goes to
`/v1/completions` as rtune-rendered token ids (`prompt="text"`: the rendered string, for servers
that take text only; a server then tokenizes it itself, and a special token's spelling inside
content becomes that token there, while rtune keeps it text), with the template's stop strings, its
stop ids as vLLM's `stop_token_ids`, greedy unless sampling is asked, `max_tokens`, and vLLM's
`return_token_ids`. Requests go through rtune.transport (the judges' transport: concurrency,
retries, Retry-After, timeouts), spread over the URLs, which are replicas of one model.

Which model made the outputs: `connect()` asks each URL's /v1/models. `--gen-model` names the model
(default: the only one listed). `rtune serve` reports its fingerprint (`rtune_fingerprint`, the id
`rtune eval` keys its cache by), dtype and device; for other servers the user gives one (`--gen-fingerprint`,
e.g. the id `rtune merge` prints). Replicas that report different fingerprints, dtypes or devices, or a
fingerprint other than the one given, stop everything before a prompt is sent. An `rtune serve`
reply whose system_fingerprint is not the expected one stops the run too (the outputs so far stay).

A reply is cut as rtune.infer.generate cuts HF's: from the server's token ids when it returns them
(vLLM with return_token_ids), exactly; else from its text, re-tokenized here for the token ids and
counts (`token_ids_from: "retokenized"`), with the reason from vLLM's stop_reason, SGLang's
matched_stop or TGI's finish reasons, or "ended" when the server only says it stopped (then
whether at an end id or a stop string is unknown).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

from rtune.errors import RtuneError
from rtune.infer.backends import finish_ids, reason_from, refuse_rules, reply_stops
from rtune.infer.generate import ENDED, Generation, GenerationConfig
from rtune.redact import redact_url
from rtune.transport import AttemptError, Transport, is_number, run_sync

log = logging.getLogger("rtune.infer.backends.endpoint")

PROMPT_MODES = ("ids", "text")
TEXT_PROMPT_NOTE = ("prompts were sent as rendered text (--gen-prompt text): the server tokenized them itself, so "
                    "where an instruction spells a special token (e.g. '<eos>') it became that token there, while "
                    "rtune's own token-id prompts keep such spellings as text")


def split_urls(urls: str | list[str]) -> list[str]:
    out = [u.strip().rstrip("/") for u in (urls.split(",") if isinstance(urls, str) else urls)]
    out = [u for u in out if u]
    if not out:
        raise RtuneError("--gen-url needs at least one URL (several: comma-separated replicas)")
    if len(set(out)) != len(out):
        raise RtuneError("--gen-url names the same URL twice")
    return out


def _json_object(body: str, what: str) -> dict:
    try:
        data = json.loads(body)
    except ValueError:
        raise AttemptError("invalid_response", f"{what}: the body is not JSON ({len(body)} chars)") from None
    if not isinstance(data, dict):
        raise AttemptError("invalid_response", f"{what}: the body is not a JSON object")
    return data


def parse_models(body: str, url: str) -> list[dict]:
    data = _json_object(body, "/v1/models")
    cards = data.get("data")
    if not isinstance(cards, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in cards):
        raise AttemptError("invalid_response", "/v1/models: no data list of models with ids")
    return cards


def parse_completion(body: str, url: str) -> dict:
    """A /v1/completions body -> its first choice's fields that rtune reads."""
    data = _json_object(body, "/v1/completions")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise AttemptError("invalid_response", "no choices[0]")
    choice = choices[0]
    if not isinstance(choice.get("text"), str):
        raise AttemptError("invalid_response", "no choices[0].text string")
    ids = choice.get("token_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
        raise AttemptError("invalid_response", "choices[0].token_ids is not a list of ids")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return {"text": choice["text"], "finish_reason": choice.get("finish_reason"), "token_ids": ids,
            # vLLM's stop_reason: present and null means EOS; absent means the server does not say.
            "stop_reason": choice.get("stop_reason"), "has_stop_reason": "stop_reason" in choice,
            "matched_stop": choice.get("matched_stop"),
            "completion_tokens": usage.get("completion_tokens") if is_number(usage.get("completion_tokens")) else None,
            "system_fingerprint": data.get("system_fingerprint"), "url": url}


class EndpointBackend:
    name = "endpoint"
    keyed_by_batch = False  # servers batch continuously: outputs are keyed by prompt alone

    def __init__(self, urls: str | list[str], renderer, *, model: str | None = None, fingerprint: str | None = None,
                 prompt: str = "ids", concurrency: int = 32, timeout: float = 600.0, max_retries: int = 6,
                 backoff: float = 1.0, max_backoff: float = 30.0, api_key_env: str = "RTUNE_GEN_API_KEY"):
        """concurrency: requests in flight per replica; timeout: seconds per request (a long reply is slow)."""
        if prompt not in PROMPT_MODES:
            raise RtuneError(f"--gen-prompt must be one of {', '.join(PROMPT_MODES)}, got {prompt!r}")
        self.urls = split_urls(urls)
        self.renderer = renderer
        self.model, self.given_fingerprint, self.prompt = model, fingerprint, prompt
        self._transport_settings = dict(api_key_env=api_key_env, concurrency=concurrency, timeout=timeout,
                                        max_retries=max_retries, backoff=backoff, max_backoff=max_backoff)
        self.transport = Transport(self.urls, **self._transport_settings)  # generation's counters only
        self.fingerprint: str | None = None
        self.fingerprint_from: str | None = None
        self.dtype: str | None = None
        self.device: str | None = None
        self.retokenized = 0  # replies whose token ids were re-tokenized here (the server gave none)

    # -- what is served -----------------------------------------------------------------------------
    def connect(self) -> dict:
        """Ask every replica what it serves; settle the model, its fingerprint and dtype, or stop."""
        if self.fingerprint is None:
            cards = run_sync(self._list_models)
            self._settle(cards)
        return self.info()

    async def _list_models(self) -> list[list[dict]]:
        # Its own transport (generation's counters stay the generations'), few retries: a replica that
        # does not answer now is reported at once.
        async with Transport(self.urls, **{**self._transport_settings, "max_retries": 2}) as transport:
            async def one(i: int):
                done = await transport.request(lambda sdk: sdk.models.with_raw_response.list(), parse_models,
                                               label=f"models of {redact_url(self.urls[i])}", replica=i)
                if not done.ok:
                    raise RtuneError(f"cannot ask {redact_url(self.urls[i])} what it serves (GET /models): {done.error}")
                return done.value
            return list(await asyncio.gather(*(one(i) for i in range(len(self.urls)))))

    def _settle(self, cards_per_url: list[list[dict]]) -> None:
        chosen = []
        for url, cards in zip(self.urls, cards_per_url):
            names = [c["id"] for c in cards]
            if self.model is None and len(names) != 1:
                raise RtuneError(f"{redact_url(url)} serves {len(names)} models ({', '.join(names) or 'none'}): "
                                 "name one with --gen-model")
            name = self.model or names[0]
            if name not in names:
                raise RtuneError(f"{redact_url(url)} does not serve {name!r} (it lists {', '.join(names) or 'none'})")
            chosen.append(next(c for c in cards if c["id"] == name))
        if len({c["id"] for c in chosen}) > 1:
            raise RtuneError("the --gen-url replicas serve different models: " + ", ".join(
                f"{redact_url(u)}: {c['id']}" for u, c in zip(self.urls, chosen)) + " (name one with --gen-model)")
        self.model = chosen[0]["id"]
        reported = [c.get("rtune_fingerprint") if isinstance(c.get("rtune_fingerprint"), str) else None
                    for c in chosen]
        if self.given_fingerprint is not None:
            for url, fp in zip(self.urls, reported):
                if fp is not None and fp != self.given_fingerprint:
                    raise RtuneError(f"{redact_url(url)} reports fingerprint {fp} for {self.model!r}, not the "
                                     f"--gen-fingerprint {self.given_fingerprint}: it serves other weights")
            self.fingerprint, self.fingerprint_from = self.given_fingerprint, "--gen-fingerprint"
        else:
            unknown = [u for u, fp in zip(self.urls, reported) if fp is None]
            if unknown:
                raise RtuneError(f"{', '.join(map(redact_url, unknown))} does not report which weights it serves "
                                 "(rtune serve does, in /v1/models); give --gen-fingerprint FP: an id that changes "
                                 "with the weights, e.g. the one `rtune merge` prints for a merged folder")
            if len(set(reported)) > 1:
                raise RtuneError("the --gen-url replicas serve different weights: " + "; ".join(
                    f"{redact_url(u)} has fingerprint {fp}" for u, fp in zip(self.urls, reported))
                    + ". Nothing was generated.")
            self.fingerprint, self.fingerprint_from = reported[0], "rtune serve"
        # rtune serve also says its dtype and device type, which change outputs as the weights do.
        for field in ("dtype", "device"):
            values = [c.get(field) if isinstance(c.get(field), str) else None for c in chosen]
            if len(set(values)) > 1:
                raise RtuneError(f"the --gen-url replicas run on different {field}s: " + ", ".join(
                    f"{redact_url(u)}: {v}" for u, v in zip(self.urls, values)) + ". Nothing was generated.")
            setattr(self, field, values[0])

    def model_fingerprint(self) -> dict:
        """What identifies the outputs (rtune eval's cache folder): the local template, the served model's
        name, fingerprint and dtype."""
        self.connect()
        fp = {"kind": "endpoint", "renderer": hashlib.sha256(json.dumps(self.renderer.to_dict(), sort_keys=True)
                                                             .encode()).hexdigest(),
              "model": self.model, "fingerprint": self.fingerprint, "dtype": self.dtype, "device": self.device}
        fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
        return {**fp, "fingerprint_from": self.fingerprint_from}

    def environment(self) -> dict:
        return {"backend": "endpoint", "model": self.model, "fingerprint": self.fingerprint, "dtype": self.dtype,
                "device": self.device, "prompt": self.prompt}

    def info(self) -> dict:
        """For summaries: where the outputs came from (URLs without credentials) and how."""
        out = {"backend": "endpoint", "urls": [redact_url(u) for u in self.urls], "model": self.model,
               "fingerprint": self.fingerprint, "fingerprint_from": self.fingerprint_from, "dtype": self.dtype,
               "device": self.device, "prompt": self.prompt, "transport": self.transport.counters(), "retokenized": self.retokenized}
        if self.prompt == "text":
            out["note"] = TEXT_PROMPT_NOTE
        return out

    def load(self) -> None:
        self.connect()

    def close(self) -> None:
        pass

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, batches: list[dict[str, list[int]]], config: GenerationConfig, done,
                 progress: bool = False) -> None:
        refuse_rules(config, "an endpoint")
        self.connect()
        prompts = {k: ids for batch in batches for k, ids in batch.items()}
        run_sync(lambda: self._generate_all(prompts, config, done, progress))

    def _body(self, ids: list[int], config: GenerationConfig, stops) -> dict:
        tokenizer = self.renderer.tokenizer
        if self.prompt == "ids":
            prompt = list(ids)
        else:  # the server adds the BOS its tokenizer adds (the renderer put that one first)
            bos = self.renderer.bos_id
            prompt = tokenizer.decode(ids[1:] if bos is not None and ids[:1] == [bos] else ids,
                                      skip_special_tokens=False, clean_up_tokenization_spaces=False)
        named = {"max_tokens": config.max_new_tokens, "temperature": config.temperature if config.do_sample else 0.0}
        extra = {"stop_token_ids": list(stops.all_ids), "return_token_ids": True}
        if stops.strings:
            named["stop"] = list(stops.strings)
        if config.do_sample:
            named.update(top_p=config.top_p, seed=config.seed)
            if config.top_k:
                extra["top_k"] = config.top_k
        if config.repetition_penalty != 1.0:
            extra["repetition_penalty"] = config.repetition_penalty
        return {"prompt": prompt, "named": named, "extra": extra}

    async def _generate_all(self, prompts: dict[str, list[int]], config: GenerationConfig, done, progress) -> None:
        from tqdm.auto import tqdm

        tokenizer = self.renderer.tokenizer
        stops = reply_stops(tokenizer, self.renderer, config)
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=None if progress else True)
        failed: list[str] = []

        async def one(key: str, ids: list[int]) -> None:
            body = self._body(ids, config, stops)

            def send(sdk):
                return sdk.completions.with_raw_response.create(model=self.model, prompt=body["prompt"],
                                                                **body["named"], extra_body=body["extra"])

            outcome = await self.transport.request(send, self._checked_completion, label=f"prompt {key[:12]}")
            if not outcome.ok:
                failed.append(outcome.error)
                return
            done({key: self._generation(outcome.value, stops)})  # cached as it arrives
            bar.update(1)

        try:
            async with self.transport:
                async with asyncio.TaskGroup() as tg:
                    for key, ids in prompts.items():
                        tg.create_task(one(key, ids))
        except ExceptionGroup as group:  # a fingerprint that changed, or a bug: raise it as itself
            raise group.exceptions[0] from None
        finally:
            bar.close()
        if failed:
            raise RtuneError(f"{len(failed)} of {len(prompts)} prompts got no answer from {', '.join(map(redact_url, self.urls))} "
                             f"after retries (the {len(prompts) - len(failed)} answered are kept; run again for the "
                             f"rest). Last error: {failed[-1]}")

    def _checked_completion(self, body: str, url: str) -> dict:
        parsed = parse_completion(body, url)
        served = parsed["system_fingerprint"]
        if self.fingerprint_from == "rtune serve" and isinstance(served, str) and served != self.fingerprint:
            raise RtuneError(f"{url} answered with fingerprint {served}, but it reported {self.fingerprint} when the "
                             "run started: its weights changed mid-run. The outputs made before are kept.")
        return parsed

    def _generation(self, reply: dict, stops) -> Generation:
        tokenizer = self.renderer.tokenizer
        ended = reply["finish_reason"] not in ("length", None)
        if reply["token_ids"] is not None:  # exact: cut as HF's ids are
            gen = finish_ids(tokenizer, reply["token_ids"], stops, ended, reply["stop_reason"])
            gen.token_ids_from = "server"
            return gen
        # Text only: cut it as the HF path cuts, and re-tokenize it for the token ids and counts.
        text = reply["text"]
        reason = self._reason(reply, stops)
        at = [i for i in (text.find(s) for s in stops.strings) if i >= 0]
        if at:  # a server that did not cut at a stop string
            text, reason = text[: min(at)], "stop"
        if reason == "stop":
            text = text.rstrip()  # as the HF path cuts, with the whitespace before the stop string
        if stops.cleanup is not None:
            text = stops.cleanup(text)
        ids = self.renderer.encode_text(text)
        self.retokenized += 1
        return Generation(text=text, token_ids=ids, finish_reason=reason, num_tokens=len(ids),
                          token_ids_from="retokenized")

    @staticmethod
    def _reason(reply: dict, stops) -> str:
        finish = reply["finish_reason"]
        if finish in ("length", None):
            return "length"
        if finish == "eos_token":  # TGI
            return "eos"
        if finish == "stop_sequence":
            return "stop"
        if reply["has_stop_reason"]:  # vLLM
            return reason_from(reply["stop_reason"], stops)
        if reply["matched_stop"] is not None:  # SGLang: an id or a string
            return reason_from(reply["matched_stop"], stops)
        return ENDED
