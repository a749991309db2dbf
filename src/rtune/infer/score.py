"""Log-likelihood of responses under a model, reusing the instruction's KV cache across candidates.

A response is scored on exactly the tokens training puts its loss on: the response and its end
token, as `Renderer.render_training` labels them, with method "it" when an instruction is given
and "rt" (no user turn at all) when it is None. So a score is the negative summed training loss of
that (instruction, response) example, and "given no instruction" is the distribution RT learns.

Every candidate response of one instruction shares the rendered prompt prefix. The prefix runs
through the model once; its KV cache is copied along the batch dimension and the candidates
continue from it in right-padded batches. With right padding every real token keeps the position
it has in the full sequence (positions count on from the cache length), and pads come after the
real tokens, so causal attention never lets a real token see one; the attention mask marks them
anyway, and pad positions are never scored.

Response ranking (`response_ranking`) is a judge-free check in the spirit of Hewitt et al. 2024
("Instruction Following without Instruction Tuning", arXiv 2409.14254): does the model, given an
instruction, prefer that instruction's own response over the responses written for other
instructions? See `ranking_from_scores` for the exact definition used here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from rtune.errors import RtuneError
from rtune.models.heads import causal_lm_parts, gpu_row_chunk
from rtune.render import IGNORE


@dataclass(frozen=True)
class ResponseScore:
    logprob: float  # sum of log p(token | everything before it) over the scored tokens
    num_tokens: int  # how many tokens were scored (response tokens, plus the end token when included)

    @property
    def mean_logprob(self) -> float:
        return self.logprob / self.num_tokens


@dataclass(frozen=True)
class RankingResult:
    top1: float  # share of instructions whose own response scores highest (strictly) among all responses
    pairwise: float  # share of (instruction, other response) pairs where the own response scores higher
    num_instructions: int


# -- rendering ------------------------------------------------------------------------------------
def scored_tokens(
    renderer, instruction: str | None, response: str, include_eos: bool = True
) -> tuple[list[int], list[int]]:
    """(prefix ids, scored ids) of one example: the scored ids are its trained tokens.

    The prefix is everything before the first trained token; untrained tokens after the last
    trained one (e.g. a newline a chat template puts after its turn-end token) are dropped.
    """
    if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
        raise RtuneError("instruction must be a non-empty string, or None to score without an instruction")
    if not renderer.trainable:
        # An in-context format (URIAL...) renders prompts only: the response is scored as the text that
        # follows its prompt, stripped as the format strips content; no end token (a stop string ends it).
        if instruction is None:
            raise RtuneError("an in-context format scores a response given an instruction only")
        return renderer.render_prompt(instruction), renderer.encode_text(response.strip())
    method = "rt" if instruction is None else "it"
    seq = renderer.render_training({"instruction": instruction or "", "response": response}, method)
    if seq is None:  # only possible with truncation, which is not used here; kept as a guard
        raise RtuneError(f"nothing to score in response {response[:40]!r}")
    trained = [i for i, label in enumerate(seq.labels) if label != IGNORE]
    first, last = trained[0], trained[-1]
    if trained != list(range(first, last + 1)):
        raise RtuneError("the trained tokens of a single-turn example are not contiguous; cannot score it")
    prefix, targets = seq.input_ids[:first], seq.input_ids[first : last + 1]
    if not include_eos:
        end = list(renderer.template.end_ids)
        if targets[-len(end) :] != end:
            raise RtuneError(f"the rendered response does not end with the end token(s) {end}")
        targets = targets[: -len(end)]
    if not prefix:
        raise RtuneError("the rendered prompt prefix is empty; there is nothing to condition the response on")
    return prefix, targets


# -- the model --------------------------------------------------------------------------------------
# Rows per forward pass are bounded by tokens, not by a count. Measured on 2 CPU cores (Gemma 3 270M,
# bf16): a forward pass of 16 x 128 tokens ran at ~3,100 tokens/s, 1 x 128 at ~2,000 and 64 x 128 at
# ~2,200 (activations out of cache), so CPU passes take about 2,048 tokens; GPUs take more.
CPU_BATCH_TOKENS = 2048  # rows x padded width per forward pass on CPUs
GPU_BATCH_TOKENS = 16384
CACHE_FACTOR = 8  # a pass continuing cached prefixes holds rows x (prefix + width) <= this x the token bound
MAX_PADDING = 0.25  # a row joins a batch only if it is at least 75% as long as the batch's longest
CPU_SCORE_ROWS = 1024  # positions per output-layer chunk on CPUs: each chunk reads the output weight once
CPU_SCORE_TILE_BYTES = 2 * 2**20  # fp32 logits of one tile on CPUs (see _tiling)


@dataclass(frozen=True)
class RowScore:
    """The scored tokens of one row: log p of each, and (when asked) how many vocabulary entries the
    model rated strictly higher than it, counted up to `rank_cap` (0 = the model's top-1)."""

    logprobs: list[float] | None  # None when not asked for (score_rows(logprobs=False))
    ranks: list[int] | None = None


def _device(model):
    return next(model.parameters()).device


def _head_of(model):
    """(decoder body, output weight, final logit soft-cap) of `model`, or None to use its full logits."""
    parts = causal_lm_parts(model)
    return None if parts is None else (parts[0], parts[1].weight, parts[2])


def _tiling(n: int, vocab: int, device_type: str) -> tuple[int, int]:
    """(rows per chunk, vocabulary entries per tile). On CPUs a tile's fp32 logits take ~2 MiB, one
    core's L2 cache: the log-sum-exp passes over a tile then run from cache (measured on 2 AMX cores:
    1,024 positions x Gemma's 262k vocabulary in 0.32 s with 512-wide tiles, 0.83 s with 8 MiB ones)."""
    if device_type != "cpu":
        return gpu_row_chunk(vocab), vocab
    rows = min(n, CPU_SCORE_ROWS)
    return rows, min(vocab, max(64, CPU_SCORE_TILE_BYTES // (4 * rows) // 64 * 64))


def _position_scores(tile, n: int, vocab: int, targets: torch.Tensor, rank_cap: int, device_type: str,
                     want_logprobs: bool = True):
    """(log p of each target [n] or None, capped ranks [n] or None) from `tile(rows, start, end)`: the fp32
    logits of positions `rows` over vocabulary entries [start, end), a new tensor (changed in place here).

    Rows go in chunks and the vocabulary in tiles, the log-sum-exp online over the tiles. The tiles
    hold the model's own logits (its dtype, cast to fp32), so the values are those of log_softmax over
    them. A rank is the number of entries strictly above the target's logit, up to rank_cap: kept as
    the running top rank_cap logits, so ties count for the target.
    """
    chunk, width = _tiling(n, vocab, device_type)
    logprobs = torch.empty(n, dtype=torch.float32, device=targets.device) if want_logprobs else None
    ranks = torch.empty(n, dtype=torch.long, device=targets.device) if rank_cap else None
    for r0 in range(0, n, chunk):
        rows = slice(r0, min(n, r0 + chunk))
        t = targets[rows]
        m = t.size(0)
        run_max = torch.full((m,), -math.inf, device=t.device)
        run_sum = torch.zeros(m, device=t.device)
        target_logit = torch.zeros(m, device=t.device)
        top = torch.full((m, rank_cap), -math.inf, device=t.device) if rank_cap else None
        for v0 in range(0, vocab, width):
            z = tile(rows, v0, min(vocab, v0 + width))
            hit = ((t >= v0) & (t < v0 + z.size(1))).nonzero().squeeze(1)
            target_logit[hit] = z[hit, t[hit] - v0]
            tile_max = z.amax(dim=1)
            if rank_cap:
                # Only rows whose running top values this tile can change (its maximum beats their
                # lowest): after the first tiles, few rows of each tile.
                need = (tile_max > top[:, -1]).nonzero().squeeze(1)
                if need.numel():
                    tile_top = z[need].topk(min(rank_cap, z.size(1)), dim=1).values
                    top[need] = torch.cat([top[need], tile_top], dim=1).topk(rank_cap, dim=1).values
            if want_logprobs:
                new_max = torch.maximum(run_max, tile_max)
                run_sum = run_sum * torch.exp(run_max - new_max) + z.sub_(new_max[:, None]).exp_().sum(dim=1)
                run_max = new_max
        if want_logprobs:
            logprobs[rows] = target_logit - (run_max + run_sum.log())
        if rank_cap:
            ranks[rows] = (top > target_logit[:, None]).sum(dim=1)
    return logprobs, ranks


def _forward_hidden(model, parts, **inputs):
    """(last hidden states, or the full logits when the model has no separate output layer; the cache)."""
    if parts is not None:
        out = parts[0](**inputs)
        return out.last_hidden_state, out.past_key_values
    out = model(**inputs)
    return out.logits, out.past_key_values


def _score_positions(parts, states: torch.Tensor, targets: list[int], rank_cap: int, want_logprobs: bool):
    """Scores of the positions `states` [n, H] (hidden states, or logits without `parts`) for `targets`."""
    target = torch.tensor(targets, device=states.device)
    if parts is None:
        return _position_scores(lambda rows, a, b: states[rows, a:b].to(torch.float32, copy=True),
                                states.size(0), states.size(-1), target, rank_cap, states.device.type,
                                want_logprobs)
    _, weight, softcap = parts

    def tile(rows, a, b):
        z = torch.nn.functional.linear(states[rows], weight[a:b])  # the output layer's matmul, in its dtype
        if softcap:  # as the model applies it (transformers' Gemma 2 / 3): divide, tanh, multiply
            z = (z / softcap).tanh() * softcap
        return z.float()  # a new tensor either way (the matmul's output)

    return _position_scores(tile, states.size(0), weight.size(0), target, rank_cap, states.device.type,
                            want_logprobs)


def _batches(items: list, length, cost, limit: int) -> list[list]:
    """`items` (sorted longest first by `length`) cut into consecutive batches whose cost(batch) stays
    within `limit` and whose rows waste at most MAX_PADDING of the longest row in padding."""
    out: list[list] = []
    for item in items:
        if out and cost(out[-1] + [item]) <= limit and length(item) >= (1 - MAX_PADDING) * length(out[-1][0]):
            out[-1].append(item)
        else:
            out.append([item])
    return out


def _run_plain(model, parts, rows, indices: list[int], max_tokens: int, kept: list) -> None:
    """rows[i] for i in `indices` as whole sequences (prefix + targets), right-padded, several per forward pass."""
    device = _device(model)
    order = sorted(indices, key=lambda i: len(rows[i][0]) + len(rows[i][1]), reverse=True)
    seqs = {i: rows[i][0] + rows[i][1][:-1] for i in order}  # the last target predicts nothing: not fed
    for batch in _batches(order, lambda i: len(seqs[i]), lambda b: len(b) * len(seqs[b[0]]), max_tokens):
        width = len(seqs[batch[0]])
        ids = torch.zeros((len(batch), width), dtype=torch.long)  # pad id 0: masked and never scored
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, i in enumerate(batch):
            ids[b, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[b, : len(seqs[i])] = 1
        positions = torch.arange(width).expand(len(batch), -1)
        states, _ = _forward_hidden(model, parts, input_ids=ids.to(device), attention_mask=mask.to(device),
                                    position_ids=positions.to(device), use_cache=False)
        picked = [(b, len(rows[i][0]) - 1, len(rows[i][1])) for b, i in enumerate(batch)]
        _keep(states, picked, [rows[i][1] for i in batch], batch, kept)


def _run_shared(model, parts, prefix: list[list[int]], members: list, rows, max_tokens: int, kept: list) -> None:
    """Rows of one group of prefixes, each prefix's KV cache computed once for all its rows.

    `members[g]` lists the rows continuing prefix g. Pass 1 runs the prefixes (all but their last
    token) left-padded, so every real token keeps its position; pass 2 continues every row from its
    prefix's cache rows: the prefix's last token again (its logits predict the first target), then
    the targets, right-padded. Pads are masked and never scored.
    """
    device = _device(model)
    lengths = [len(p) for p in prefix]
    width = max(lengths) - 1
    ids = torch.zeros((len(prefix), width), dtype=torch.long)
    mask = torch.zeros((len(prefix), width), dtype=torch.long)
    for g, p in enumerate(prefix):
        ids[g, width - len(p) + 1 :] = torch.tensor(p[:-1])
        mask[g, width - len(p) + 1 :] = 1
    positions = (torch.arange(width) - (width + 1 - torch.tensor(lengths))[:, None]).clamp(min=0)
    _, cache = _forward_hidden(model, parts, input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=positions.to(device), use_cache=True)
    owner = {i: g for g, rows_of in enumerate(members) for i in rows_of}
    order = sorted(owner, key=lambda i: len(rows[i][1]), reverse=True)
    def cost(b):  # the pass's tokens, unless the prefix caches it holds are the tighter bound
        cols = len(rows[b[0]][1])
        return max(len(b) * cols, len(b) * (width + cols) / CACHE_FACTOR)

    for batch in _batches(order, lambda i: len(rows[i][1]), cost, max_tokens):
        cols = len(rows[batch[0]][1])
        row_ids = torch.zeros((len(batch), cols), dtype=torch.long)
        row_mask = torch.zeros((len(batch), cols), dtype=torch.long)
        for b, i in enumerate(batch):
            seq = [prefix[owner[i]][-1]] + rows[i][1][:-1]
            row_ids[b, : len(seq)] = torch.tensor(seq)
            row_mask[b, : len(seq)] = 1
        index = torch.tensor([owner[i] for i in batch])
        # The forward pass appends to the cache it is given: each batch continues its own copy.
        past = copy.deepcopy(cache)
        past.batch_select_indices(index.to(device))
        row_positions = torch.tensor([lengths[owner[i]] - 1 for i in batch])[:, None] + torch.arange(cols)
        states, _ = _forward_hidden(model, parts, input_ids=row_ids.to(device),
                                    attention_mask=torch.cat([mask[index], row_mask], dim=1).to(device),
                                    position_ids=row_positions.to(device), past_key_values=past, use_cache=True)
        picked = [(b, 0, len(rows[i][1])) for b, i in enumerate(batch)]
        _keep(states, picked, [rows[i][1] for i in batch], batch, kept)


def _keep(states, picked, targets, batch, kept) -> None:
    """Keep positions [start, start + n) of each batch row b in `picked` (scored later, all at once)."""
    kept.append((torch.cat([states[b, start : start + n] for b, start, n in picked]),
                    [t for ts in targets for t in ts], [(i, n) for (_, _, n), i in zip(picked, batch)]))


def score_rows(model, rows: list[tuple[list[int], list[int]]], rank_cap: int = 0,
               max_tokens: int | None = None, logprobs: bool = True) -> list[RowScore]:
    """Score the targets of each row (prefix ids, target ids) given its prefix, in input order.

    Rows that share a prefix share its KV cache: the prefix runs once (pass 1), its rows continue
    from it (pass 2); a prefix of its own runs with its row as one sequence. Either way, many rows
    go into each forward pass, up to `max_tokens` (rows x padded width; default CPU_BATCH_TOKENS or
    GPU_BATCH_TOKENS); the output layer runs only at the scored positions (see _position_scores).
    `rank_cap` > 0 also gives each target's rank (see RowScore); logprobs=False leaves out the
    log-probabilities (their log-sum-exp over the vocabulary). The model should be in eval mode.
    """
    if max_tokens is None:
        max_tokens = CPU_BATCH_TOKENS if _device(model).type == "cpu" else GPU_BATCH_TOKENS
    for prefix, targets in rows:
        if not prefix or not targets:
            raise RtuneError("a scored row needs a non-empty prefix and at least one target token")
    parts = _head_of(model)
    groups: dict[tuple, list[int]] = {}
    for i, (prefix, _) in enumerate(rows):
        groups.setdefault(tuple(prefix), []).append(i)
    shared = [(list(p), members) for p, members in groups.items() if len(members) > 1 and len(p) > 1]
    plain = [i for p, members in groups.items() if not (len(members) > 1 and len(p) > 1) for i in members]
    kept = []  # (hidden states of scored positions, their targets, [(row, positions)]) per forward pass
    with torch.inference_mode():
        if plain:
            _run_plain(model, parts, rows, plain, max_tokens, kept)
        # Prefixes of similar length together (less padding in pass 1), as many as one pass takes.
        shared.sort(key=lambda g: len(g[0]), reverse=True)
        for chunk in _batches(shared, lambda g: len(g[0]), lambda gs: len(gs) * len(gs[0][0]), max_tokens):
            _run_shared(model, parts, [p for p, _ in chunk], [m for _, m in chunk], rows, max_tokens, kept)
        # The output layer over every pass's positions at once: full row chunks, each reading its weight once.
        if not kept:
            return []
        lp, rk = _score_positions(parts, torch.cat([k[0] for k in kept]), [t for k in kept for t in k[1]],
                                  rank_cap, logprobs)
    lp = lp.tolist() if lp is not None else None
    rk = rk.tolist() if rk is not None else None
    results: list[RowScore | None] = [None] * len(rows)
    at = 0
    for i, n in (row for k in kept for row in k[2]):
        results[i] = RowScore(lp[at : at + n] if lp is not None else None, rk[at : at + n] if rk is not None else None)
        at += n
    return results  # type: ignore[return-value]


# -- public API -------------------------------------------------------------------------------------
def score_responses(
    model,
    renderer,
    instruction: str | None,
    responses: list[str],
    batch_size: int = 8,
    include_eos: bool = True,
) -> list[ResponseScore]:
    """Log-likelihood of each response given `instruction` (None: given no instruction), in input order.

    The model should be in eval mode (rtune's loaders return it so). The prompt prefix runs once;
    candidates are scored continuing from its KV cache, `batch_size` at most per forward pass.
    """
    if batch_size < 1:
        raise RtuneError(f"batch_size must be >= 1, got {batch_size}")
    if not responses:
        return []
    split = [scored_tokens(renderer, instruction, r, include_eos) for r in responses]
    prefix = split[0][0]
    if any(p != prefix for p, _ in split):
        raise RtuneError("the candidates rendered with different prompt prefixes; they cannot share a cache")
    scores = []
    for start in range(0, len(split), batch_size):
        for (_, targets), row in zip(split[start : start + batch_size],
                                     score_rows(model, split[start : start + batch_size])):
            scores.append(ResponseScore(logprob=sum(row.logprobs), num_tokens=len(targets)))
    return scores


def score_pairs(
    model,
    renderer,
    instructions: list[str | None],
    responses: list[str],
    batch_size: int = 8,
    include_eos: bool = True,
) -> list[list[ResponseScore]]:
    """The matrix of scores: result[i][j] is response j given instruction i (None: no instruction)."""
    return [score_responses(model, renderer, x, responses, batch_size, include_eos) for x in instructions]


def ranking_from_scores(conditional: list[list[float]], unconditional: list[float] | None = None) -> RankingResult:
    """Response ranking from a square matrix: conditional[i][j] = log p(response j | instruction i).

    Response j's score for instruction i is s(i, j) = conditional[i][j], minus unconditional[j]
    (log p(response j) with no instruction) when that is given. The subtraction makes responses
    of different lengths comparable: it is how much instruction i raises response j's likelihood
    (pointwise mutual information), so a short or generic response does not win every row.

    top1: the share of instructions i with s(i, i) > s(i, j) for every j != i.
    pairwise: the share of ordered pairs (i, j), j != i, with s(i, i) > s(i, j).
    Ties count as failures, so a model that cannot tell responses apart scores 0, not 1.
    """
    n = len(conditional)
    if n < 2:
        raise RtuneError(f"response ranking needs at least 2 instructions, got {n}")
    if any(len(row) != n for row in conditional):
        raise RtuneError("response ranking needs a square matrix: one response per instruction")
    if unconditional is not None and len(unconditional) != n:
        raise RtuneError(f"expected {n} unconditional scores, got {len(unconditional)}")
    base = unconditional if unconditional is not None else [0.0] * n
    top1 = pairs = 0
    for i, row in enumerate(conditional):
        s = [row[j] - base[j] for j in range(n)]
        wins = sum(1 for j in range(n) if j != i and s[i] > s[j])
        pairs += wins
        top1 += wins == n - 1
    return RankingResult(top1=top1 / n, pairwise=pairs / (n * (n - 1)), num_instructions=n)


def response_ranking(
    model,
    renderer,
    instructions: list[str],
    responses: list[str],
    normalize: bool = True,
    batch_size: int = 8,
    include_eos: bool = True,
) -> RankingResult:
    """How often the model prefers each instruction's own response (responses[i] for instructions[i]).

    Scores every response under every instruction and, when `normalize`, under no instruction
    too; see `ranking_from_scores` for the definition. normalize=False ranks by the raw
    likelihood given the instruction, which favours short responses.
    """
    if len(instructions) != len(responses):
        raise RtuneError(f"{len(instructions)} instructions but {len(responses)} responses: pair them one to one")
    matrix = score_pairs(model, renderer, instructions, responses, batch_size, include_eos)
    conditional = [[s.logprob for s in row] for row in matrix]
    unconditional = None
    if normalize:
        unconditional = [s.logprob for s in score_responses(model, renderer, None, responses, batch_size, include_eos)]
    return ranking_from_scores(conditional, unconditional)
