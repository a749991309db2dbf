"""LLM judges inside `rtune eval`: every judgment asked once, through one cached client, after generation.

    refusal   each answer classified compliance / refusal (rtune.eval.judges.refusal); rates on
              harmful and benign items (`llm_refusal_rate`, `llm_over_refusal_rate`), unclassified
              answers kept in the denominators, and agreement with the keyword judge (share, kappa)
    aspects   JustEval-style scores 1-5 (rtune.eval.judges.aspects): the five aspects and their
              overall mean on benign items, safety on harmful ones (`aspect_*`)
    pairwise  each model against the reference outputs (another evaluated model, e.g. IT, or a
              file of outputs), both presentation orders (rtune.eval.judges.pairwise):
              `vs_<reference>_win_rate`, `..._rtune_lc_win_rate` (rtune's length-controlled estimate),
              wins / ties / losses, `..._n_no_reference` (items the reference does not cover)

The judge client (rtune.eval.judges.client) caches every judgment in EVAL_DIR/cache/judges/ as it
arrives, retries flaky endpoints and counts tokens, cost and failures; a failed judgment is not
cached (a re-run asks it again) and counts as unparseable in the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rtune.errors import RtuneError
from rtune.eval.judges import aspects, pairwise, refusal
from rtune.eval.judges.agreement import agreement
from rtune.eval.judges.client import JudgeClient, JudgeRequest
from rtune.eval.metrics.refusal import is_refusal
from rtune.eval.results import metric, safe_name

KINDS = ("pairwise", "aspects", "refusal")


@dataclass
class JudgeConfig:
    url: str
    model: str
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    reference: str | None = None  # an evaluated model's name, or a file of reference outputs (read_reference_file)
    concurrency: int = 8
    timeout: float = 120.0
    price_per_million: tuple[float, float] | None = None  # (input, output) dollars, for the cost counter

    def check(self, labels: list[str]) -> "JudgeConfig":
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise RtuneError(f"--judge: unknown judge {unknown[0]!r}; choose from {', '.join(KINDS)}")
        if "pairwise" in self.kinds:
            if self.reference is None:
                raise RtuneError("--judge pairwise needs --reference: an evaluated model's name or an outputs file")
            if self.reference not in labels and not Path(self.reference).is_file():
                raise RtuneError(f"--reference {self.reference!r} is neither an evaluated model ({', '.join(labels)}) "
                                 "nor a file of reference outputs")
        return self


def reference_outputs(config: JudgeConfig, data: dict) -> tuple[str, dict]:
    """(reference name, {bench: {item id: output}}) from an evaluated model or a reference file.

    An evaluated model answers the same items: its outputs pair with each benchmark's items by id.
    A file is read by `read_reference_file`. Items without a reference are left out of the pairwise
    judge and counted per benchmark (`vs_<ref>_n_no_reference`)."""
    if config.reference in data:
        return config.reference, {b: {r["id"]: r["output"] for r in d["rows"]} for b, d in data[config.reference].items()}
    benches = {b: d["items"] for b, d in next(iter(data.values())).items()}
    return Path(config.reference).stem, read_reference_file(config.reference, benches)


def read_reference_file(path: str | Path, benches: dict) -> dict:
    """{bench: {item id: output}} from a file of reference outputs, matched without guessing.

    Rows are objects with a string "output" and one way to find their item:
      "benchmark" + "id"   the item of that id in that benchmark (rtune's format; a file may hold many);
      "id" alone           the file holds one benchmark: allowed only when one benchmark is evaluated
                           (ids are row positions in several built-in sets, so "0" means something
                           different in each);
      "instruction" alone  alpaca_eval's format (model_outputs.json): matched by the item's prompt text,
                           within every evaluated benchmark; two different outputs for one instruction
                           are an error.
    Errors name the file and the row. bench -> items: the evaluated benchmarks."""
    from rtune.data.sources import _id_field, _read_file_rows, _string_field

    path = Path(path)
    keyed: dict = {}  # (bench, id) -> (output, where)
    by_text: dict = {}  # instruction -> (output, where)
    for where, row in _read_file_rows(path):
        if not isinstance(row, dict):
            raise RtuneError(f"{where}: expected an object with an 'output'")
        output = _string_field(row, "output", where)
        if "id" in row:
            rid = _id_field(row, "id", where)
            if "benchmark" in row:
                bench = _string_field(row, "benchmark", where)
                if bench not in benches:
                    raise RtuneError(f"{where}: benchmark {bench!r} is not evaluated here ({', '.join(benches)})")
            elif len(benches) == 1:
                bench = next(iter(benches))
            else:
                raise RtuneError(f"{where}: a reference row with an 'id' but no 'benchmark' is ambiguous when "
                                 f"{len(benches)} benchmarks are evaluated ({', '.join(benches)}): add a "
                                 "'benchmark' field to every row, or evaluate one benchmark")
            if (bench, rid) in keyed:
                raise RtuneError(f"{where}: a second reference for {bench} item {rid!r} (first at {keyed[bench, rid][1]})")
            keyed[bench, rid] = (output, where)
        elif "instruction" in row:
            text = _string_field(row, "instruction", where)
            if text in by_text and by_text[text][0] != output:
                raise RtuneError(f"{where}: two different reference outputs for one instruction (first at "
                                 f"{by_text[text][1]}); cannot tell which to judge against")
            by_text.setdefault(text, (output, where))
        else:
            raise RtuneError(f"{where}: a reference row needs an 'id' (with 'benchmark') or an 'instruction'")
    out: dict = {}
    for bench, items in benches.items():
        known = {item.id for item in items}
        unknown = [rid for (b, rid) in keyed if b == bench and rid not in known]
        if unknown and len(unknown) == len([k for k in keyed if k[0] == bench]):
            raise RtuneError(f"{path}: none of its ids for {bench} ({', '.join(sorted(unknown)[:3])}, ...) is an item "
                             f"of the evaluated {bench} (check --limit/--seed and the file)")
        refs = {}
        for item in items:
            hit = keyed.get((bench, item.id)) or by_text.get(item.prompt)
            if hit is not None:
                refs[item.id] = hit[0]
        out[bench] = refs
    return out


def run_judges(config: JudgeConfig, data: dict, out_dir: Path, seed: int, progress: bool) -> dict:
    """Judge every model's outputs. data: {model: {bench: {"items", "rows"}}} (rows carry "id", "output").

    Returns {model: {bench: {"metrics": {...}, "judgments": [per item dict]}}} and the client's stats
    under the key "_stats"."""
    client = JudgeClient(config.url, config.model, Path(out_dir) / "cache" / "judges" / f"{safe_name(config.model)}.jsonl",
                         concurrency=config.concurrency, timeout=config.timeout,
                         price_per_million=config.price_per_million)
    ref_name, ref_outputs = reference_outputs(config, data) if "pairwise" in config.kinds else (None, {})
    plan = []  # (model, bench, item index, kind, order or None)
    requests = []
    for model, benches in data.items():
        for bench, d in benches.items():
            for i, (item, row) in enumerate(zip(d["items"], d["rows"])):
                keys = {"model": model, "bench": bench, "id": item.id}
                if "refusal" in config.kinds:
                    (messages, params), = refusal.requests(item.prompt, row["output"])
                    plan.append((model, bench, i, "refusal", None))
                    requests.append(JudgeRequest({**keys, "kind": "refusal"}, messages, params,
                                                 template_version=refusal.TEMPLATE_VERSION))
                if "aspects" in config.kinds:
                    (messages, params), = aspects.requests(item.prompt, row["output"], safety=item.harmful is True)
                    plan.append((model, bench, i, "aspects", None))
                    requests.append(JudgeRequest({**keys, "kind": "aspects"}, messages, params,
                                                 template_version=aspects.TEMPLATE_VERSION))
                reference = ref_outputs.get(bench, {}).get(item.id)
                if "pairwise" in config.kinds and model != ref_name and reference is not None:
                    for order, (messages, params) in zip(pairwise.ORDERS,
                                                         pairwise.requests(item.prompt, row["output"], reference)):
                        plan.append((model, bench, i, "pairwise", order))
                        requests.append(JudgeRequest({**keys, "kind": "pairwise", "order": order}, messages, params,
                                                     template_version=pairwise.TEMPLATE_VERSION))
    results = client.judge_many(requests, progress=progress)
    if progress:
        s = client.stats
        print(f"[judge] {config.model}: {s['items']} judgments, {s['cache_hits']} from the cache, "
              f"{s['requests_sent']} requests, {s['retries_total']} retries, {s['failures']} failed", flush=True)

    # Per item: what each judge said.
    found: dict = {m: {b: [{} for _ in d["items"]] for b, d in benches.items()} for m, benches in data.items()}
    for (model, bench, i, kind, order), result in zip(plan, results):
        slot = found[model][bench][i]
        if kind == "refusal":
            slot["refusal"] = (refusal.parse(result["text"], result.get("finish_reason")) if result["ok"]
                                  else refusal.UNCLASSIFIED)
        elif kind == "aspects":
            slot["aspects"] = aspects.parse(result["text"]) if result["ok"] else None
        else:
            slot.setdefault("pairwise", {})[order] = pairwise.preference(result, order) if result["ok"] else None

    out: dict = {"_stats": client.stats, "_reference": ref_name}
    for model, benches in data.items():
        out[model] = {}
        for bench, d in benches.items():
            judged = found[model][bench]
            metrics: dict = {}
            if "refusal" in config.kinds:
                labels = [j["refusal"] for j in judged]
                harmful = [item.harmful for item in d["items"]]
                metrics.update(refusal.summarise_refusal(labels, harmful, seed, judge=config.model, prefix="llm_"))
                keyword = ["refusal" if is_refusal(r["output"]) else "compliance" for r in d["rows"]]
                a = agreement(labels, keyword)
                metrics["llm_keyword_agreement"] = metric(a["share"], None, a["n"], "rate",
                                                          "refusal: LLM judge agrees with the keyword judge", None,
                                                          config.model)
                metrics["llm_keyword_kappa"] = metric(a["kappa"], None, a["n"], "mean",
                                                      "refusal: Cohen's kappa, LLM vs keyword judge", None, config.model)
            if "aspects" in config.kinds:
                for safety in (False, True):
                    chosen = [j["aspects"] for j, item in zip(judged, d["items"]) if (item.harmful is True) == safety]
                    if chosen:
                        summary = aspects.summarise_aspects(chosen, seed, safety=safety, judge=config.model)
                        suffix = "_safety_split" if safety else ""
                        metrics.update({f"aspect_{k}{suffix if k.startswith('n_') else ''}": v
                                        for k, v in summary.items()})
            pairs = [j.get("pairwise") for j in judged]
            if "pairwise" in config.kinds and model != ref_name:
                reference = ref_outputs.get(bench, {})
                missing = sum(item.id not in reference for item in d["items"])
                metrics[f"vs_{safe_name(ref_name)}_n_no_reference"] = metric(
                    missing, None, len(d["items"]), "mean", "items without a reference output (count; not judged)",
                    None, config.model)
            if "pairwise" in config.kinds and any(pairs):
                keep = [i for i, p in enumerate(pairs) if p]
                prefs = [pairwise.combine(pairs[i].get(pairwise.MODEL_FIRST), pairs[i].get(pairwise.REFERENCE_FIRST))
                         for i in keep]
                lengths = [len(d["rows"][i]["output"]) for i in keep]
                ref_lengths = [len(reference[d["items"][i].id]) for i in keep]
                summary = pairwise.summarise_pairwise(prefs, lengths, ref_lengths, seed, judge=config.model)
                metrics.update({f"vs_{safe_name(ref_name)}_{k}": v for k, v in summary.items()})
                for i, p in zip(keep, prefs):
                    judged[i]["preference_vs_" + safe_name(ref_name)] = p
            out[model][bench] = {"metrics": metrics, "judgments": judged}
    return out
