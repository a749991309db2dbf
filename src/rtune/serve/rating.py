"""Blind rating of an evaluation folder (`rtune serve --rate EVAL_DIR`, `rtune rate EVAL_DIR`).

The folder is fixed when the server starts and read once (`RatingSet.load`): every model's answers
under EVAL_DIR/results/<model>/<bench>/items.jsonl. A client names models, a benchmark and an item
id, never a path; ratings go to EVAL_DIR/human/<rater>.jsonl only (rtune.eval.human).

Which answer is A (left) is decided here, not by the page: a keyed hash of (rater, bench, id, pair)
with a key drawn when the server starts, so the order is random, stable while the server runs
(a reload shows the same sides) and needs no state. The page sends "a", "b" or "tie" and the two
acceptability marks in A, B order; the server names the models behind them in the record.

Routes (bodies as Content-Type application/json only, which a cross-site form cannot send; answers
and errors in OpenAI's shape; the API key guards them as it guards /v1):
    GET  /api/rate/setup     the models, their benchmarks and the default pair (RT vs IT when both exist)
    POST /api/rate/items     {rater, models: [x, y], bench?}: the pair's items, which this rater has rated
    POST /api/rate/item      {rater, models, bench, id}: the prompt, answers A and B, this rater's last rating
    POST /api/rate/rating    {rater, models, bench, id, choice: a | b | tie, acceptable: [A?, B?]}
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request

from rtune.errors import RtuneError
from rtune.eval import human
from rtune.eval.results import EVAL_INFO, ITEMS, SUMMARY
from rtune.serve.api import ApiError, StrictBody, parse_json_body

MAX_BODY_BYTES = 16 << 10  # a rating is a few hundred bytes


@dataclass
class RatingSet:
    eval_dir: Path
    answers: dict[str, dict[str, dict[str, dict]]]  # model -> bench -> item id -> {"prompt", "output"}
    order: list[str]  # the models in eval.json's order
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, eval_dir) -> RatingSet:
        eval_dir = Path(eval_dir).resolve()
        root = eval_dir / "results"
        answers: dict = {}
        for items in sorted(root.glob(f"*/*/{ITEMS}")):
            summary = _read_json(items.parent / SUMMARY)
            model = ((summary.get("model") or {}).get("label") or items.parent.parent.name)
            bench = ((summary.get("benchmark") or {}).get("name") or items.parent.name)
            rows = {}
            for n, line in enumerate(items.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    row = json.loads(line) if line.strip() else None
                except ValueError as e:
                    raise RtuneError(f"{items}:{n}: not valid JSON: {e}") from None
                if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("output"), str):
                    rows[str(row.get("id"))] = {"prompt": row["prompt"], "output": row["output"]}
            if rows:
                answers.setdefault(model, {})[bench] = rows
        if len(answers) < 2:
            raise RtuneError(f"{eval_dir} holds answers of {len(answers)} model(s) (results/<model>/<bench>/{ITEMS}); "
                             "rating compares two")
        listed = [m.get("label") if isinstance(m, dict) else m for m in _read_json(eval_dir / EVAL_INFO).get("models") or []]
        order = [m for m in dict.fromkeys(listed) if m in answers] + sorted(set(answers) - set(listed))
        return cls(eval_dir, answers, order)

    def default_pair(self) -> list[str]:
        lower = {m.lower(): m for m in self.order}
        if "rt" in lower and "it" in lower:
            return [lower["rt"], lower["it"]]
        return self.order[:2]

    def items(self, pair: tuple[str, str], bench: str | None = None) -> list[tuple[str, str]]:
        """(bench, id) of the items both models answered, in the first model's order."""
        x, y = (self.answers[m] for m in pair)
        return [(b, i) for b, rows in x.items() if bench in (None, b) and b in y for i in rows if i in y[b]]

    def sides(self, rater: str, bench: str, item_id: str, pair: tuple[str, str]) -> tuple[str, str]:
        """(model shown as A, model shown as B)."""
        first, second = sorted(pair)
        message = "\0".join((rater, bench, item_id, first, second)).encode("utf-8")
        swap = hmac.new(self.key, message, hashlib.sha256).digest()[0] & 1
        return (second, first) if swap else (first, second)

    def rated(self, rater: str, pair: tuple[str, str]) -> dict[tuple[str, str], dict]:
        """{(bench, id): this rater's last rating} of the pair."""
        rows, _ = human.read_rater(human.rater_file(self.eval_dir, rater))
        return {(r["bench"], r["id"]): r for r in rows if {r["a"], r["b"]} == set(pair)}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- requests -----------------------------------------------------------------------------------
class PairRequest(StrictBody):
    rater: str
    models: list[str]
    bench: str | None = None


class ItemRequest(StrictBody):
    rater: str
    models: list[str]
    bench: str
    id: str


class RatingRequest(ItemRequest):
    choice: Literal["a", "b", "tie"]
    acceptable: list[bool]


def _ratings(request: Request) -> RatingSet:
    ratings = request.app.state.rating
    if ratings is None:
        raise ApiError(404, "this server rates no evaluation (start it with --rate EVAL_DIR)", None, "not_found")
    return ratings


async def _parse(request: Request, model):
    # JSON only: a cross-site form (text/plain, no preflight) cannot post a rating from a rater's browser.
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "send the body as JSON (Content-Type: application/json)", None, "unsupported_media_type")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(400, f"the request body is larger than the limit of {MAX_BODY_BYTES} bytes", None,
                       "request_too_large")
    req = parse_json_body(model, body)
    ratings = _ratings(request)
    if not human.RATER_NAME.fullmatch(req.rater):
        raise ApiError(400, "'rater' must be 1 to 64 letters, digits, '_' or '-'", "rater", "invalid_value")
    if len(req.models) != 2 or req.models[0] == req.models[1]:
        raise ApiError(400, "'models' must name two different models", "models", "invalid_value")
    for m in req.models:
        if m not in ratings.answers:
            raise ApiError(404, f"no answers of a model {m!r} in this evaluation; it has {ratings.order}", "models",
                           "model_not_found")
    return req, ratings, (req.models[0], req.models[1])


def _item(ratings: RatingSet, pair, bench: str, item_id: str) -> None:
    if not all(item_id in ratings.answers[m].get(bench, {}) for m in pair):
        raise ApiError(404, f"no item {item_id!r} of {bench!r} answered by both models", "id", "item_not_found")


router = APIRouter()


@router.get("/api/rate/setup")
async def setup(request: Request):
    ratings = _ratings(request)
    return {"models": ratings.order, "benches": {m: list(ratings.answers[m]) for m in ratings.order},
            "default_pair": ratings.default_pair()}


@router.post("/api/rate/items")
async def items(request: Request):
    req, ratings, pair = await _parse(request, PairRequest)
    done = await asyncio.to_thread(ratings.rated, req.rater, pair)
    listed = [{"bench": b, "id": i, "rated": (b, i) in done} for b, i in ratings.items(pair, req.bench)]
    return {"items": listed, "rated": sum(x["rated"] for x in listed), "total": len(listed)}


@router.post("/api/rate/item")
async def item(request: Request):
    req, ratings, pair = await _parse(request, ItemRequest)
    _item(ratings, pair, req.bench, req.id)
    a, b = ratings.sides(req.rater, req.bench, req.id, pair)
    last = (await asyncio.to_thread(ratings.rated, req.rater, pair)).get((req.bench, req.id))
    previous = None
    if last is not None:  # in this page's A/B order
        choice = "tie" if last["winner"] == human.TIE else "a" if last["winner"] == a else "b"
        previous = {"choice": choice, "acceptable": [last["acceptable"][a], last["acceptable"][b]]}
    rows = ratings.answers
    return {"bench": req.bench, "id": req.id, "prompt": rows[a][req.bench][req.id]["prompt"],
            "answers": [rows[a][req.bench][req.id]["output"], rows[b][req.bench][req.id]["output"]],
            "previous": previous}


@router.post("/api/rate/rating")
async def rate(request: Request):
    req, ratings, pair = await _parse(request, RatingRequest)
    _item(ratings, pair, req.bench, req.id)
    if len(req.acceptable) != 2:
        raise ApiError(400, "'acceptable' must be [A acceptable, B acceptable]", "acceptable", "invalid_value")
    a, b = ratings.sides(req.rater, req.bench, req.id, pair)
    winner = {"a": a, "b": b, "tie": human.TIE}[req.choice]
    record = {"rater": req.rater, "bench": req.bench, "id": req.id, "a": a, "b": b, "winner": winner,
              "acceptable": {a: req.acceptable[0], b: req.acceptable[1]}}

    def write():
        with ratings.lock:  # one writer at a time
            human.append_rating(ratings.eval_dir, record)

    await asyncio.to_thread(write)
    return {"saved": True}
