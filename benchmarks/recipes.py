"""Every recipe with the same budget on the same data and seeds, chosen on validation, reported on test.

    .venv/bin/python benchmarks/recipes.py [--epochs 80] [--seeds 0 1 2] [--only NAME ...] [--resume]

Trains each variant below with each seed (frozen image features are cached once and shared)
on the splits of training/splits.py: the validation style and a share of concepts held out
of training. Writes `benchmarks/results/recipes.json` (per seed: every evaluated set's figures;
per variant: the commit and code it was measured on) and `docs/results.md` (through
benchmarks/render_docs.py), whose sentences are computed
from those numbers: the papers' claims (instance loss + ranking beats ranking alone; HBTR beats
the plain hardest-negative triplet; two-level fusion beats either level; re-ranking beats its
first stage) are judged on the validation set's mean rsum against the seeds' spread, and so is
the default model. A run keeps the figures of the variants it does not measure; a variant measured
on other training code is shown as stale until it is run again.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
from pathlib import Path

from xmodal.training.recipes import infonce_warmup, recipe_config

ROOT = Path(__file__).resolve().parent.parent

# (name, recipe, overrides, what it shows)
VARIANTS = [
    ("infonce", "infonce", {}, "baseline: symmetric InfoNCE"),
    ("vsepp", "vsepp", {}, "baseline: hardest-negative triplet, margin 0.2, after 30% InfoNCE warm-up"),
    # The same warm-up as vsepp, then HBTR in place of the plain hardest-negative triplet.
    ("hbtr", "vsepp", {"stages": [
        infonce_warmup("global"),
        {"name": "hbtr", "fraction": 0.7, "losses": [
            {"loss": "hbtr", "level": "global", "weight": 1.0, "margin": 0.2, "centroid_margin": 0.1}]},
    ]}, "vsepp with HBTR (hardest negative + the centroid term) in place of the triplet"),
    # At centroid margin 0.1 the term hardly fires once the warm-up has spread the space (the
    # negatives' mean similarity is near 0, far below every positive), so hbtr would equal vsepp.
    # A wide margin lets it act.
    ("hbtr_wide", "vsepp", {"stages": [
        infonce_warmup("global"),
        {"name": "hbtr", "fraction": 0.7, "losses": [
            {"loss": "hbtr", "level": "global", "weight": 1.0, "margin": 0.2, "centroid_margin": 0.5}]},
    ]}, "hbtr with centroid margin 0.5"),
    ("dualpath", "dualpath", {}, "instance loss (stage I), + ranking (stage II)"),
    ("mthcn", "mthcn", {}, "two levels, InfoNCE warm-up, then SSC + HBTR at both, fused score"),
    ("ccl", "ccl", {}, "instance + fragment levels fused; pairwise + category losses balanced by learnt weights"),
    ("cmgans", "cmgans", {}, "shared-top heads, reconstruction + intra/inter-modality discriminators, InfoNCE pairs"),
    ("cran", "cran", {}, "InfoNCE first stage + CRAN pair scorer (global/local/relation), re-ranking the top 20"),
    ("mcsm", "mcsm", {}, "InfoNCE first stage + MCSM pair scorer (a space per modality), re-ranking the top 20"),
]


# name → (what it is, the recipe overrides that make it). The variant's key is "<variant> + <tower>"
# (the GloVe CNN, every recipe's default, adds nothing).
TEXT_TOWERS = {
    "glove_cnn": ("GloVe text CNN", {"text_encoder": "glove_cnn"}),
    "minilm": ("MiniLM (frozen, LiT-style)", {"text_encoder": "minilm"}),
    # Its lower 4 layers frozen and their token states cached per caption; the top 2 train at lr × 0.1.
    "minilm_top2": ("MiniLM (top 2 of 6 layers trained at lr × 0.1)",
                    {"text_encoder": "minilm", "text_freeze": "top2", "text_lr_scale": 0.1}),
}
# Towers that cost a backbone pass per step run only the variants worth that cost.
TOWER_VARIANTS = {"minilm_top2": ("infonce", "dualpath", "mthcn")}

# Natural-language queries, none of them an emoji label: which text tower understands sentences.
SENTENCE_QUERIES = [
    "a happy face crying tears of joy",
    "something sweet to eat for dessert",
    "an animal that lives in the sea",
    "a vehicle that flies through the sky",
    "the weather on a rainy day",
    "a person playing a sport with a ball",
]


# The variants whose answers to SENTENCE_QUERIES are shown: the baseline and the strongest recipes.
SENTENCE_QUERY_VARIANTS = ("infonce", "dualpath", "mthcn")


def variant_key(name: str, tower: str) -> str:
    return name if tower == "glove_cnn" else f"{name} + {tower}"


# Every variant is trained with these seeds; a figure is their mean ± sample standard deviation.
SEEDS = (0, 1, 2)
# The share of concepts (by a stable hash, training/splits.py) that no style trains on.
UNSEEN_CONCEPTS = 0.1
# The code whose change makes a result stale: it was measured on other training code. (A variant
# whose recipe or overrides in VARIANTS changed is stale too.)
MEASURED_CODE = "training"
# The sets of a run, in the table's order (training/splits.py EVALUATED): selection, then test.
SETS = {"validation": "validation", "validation_unseen": "validation, unseen concepts",
        "test": "test", "test_unseen": "test, unseen concepts"}


def run(args: argparse.Namespace) -> dict:
    """Train (or with --collect, read the finished runs of) each variant with each seed; the summary
    is saved after each variant."""
    from xmodal.cli import resolve_data
    from xmodal.training.train import train

    manifests = resolve_data(args.data)
    summary = previous_summary(args) | describe(args, manifests)
    provenance = measured_at()
    for tower in args.text_towers:
        for name, recipe, overrides, note in VARIANTS:
            if (args.only and name not in args.only) or name not in TOWER_VARIANTS.get(tower, (name,)):
                continue
            key = variant_key(name, tower)
            seeds = {}
            for seed in args.seeds:
                run_dir = args.runs / key.replace(" + ", "-") / f"seed{seed}"
                if args.collect:
                    if not (run_dir / "eval.json").exists():
                        print(f"{key} seed {seed}: no finished run in {run_dir}", flush=True)
                        continue
                elif args.resume and (run_dir / "eval.json").exists() and not (run_dir / "checkpoint.pt").exists():
                    print(f"{key} seed {seed}: finished before, collected", flush=True)
                else:
                    budget = {"epochs": args.epochs, "minutes": 600.0} if args.epochs else {"minutes": args.minutes}
                    train(manifests, run_dir, recipe=recipe, resume=args.resume, progress=not args.quiet, seed=seed,
                          validation_style=args.validation_style, unseen_concepts=args.unseen_concepts,
                          **budget, **overrides, **TEXT_TOWERS[tower][1])
                report = json.loads((run_dir / "eval.json").read_text())
                seeds[str(seed)] = {
                    "epochs": report["epochs"], "train_seconds": report["train_seconds"],
                    "figures": {name_: {output: {k: v for k, v in m.items() if k != "curve"} for output, m in report[name_].items()}
                                for name_ in SETS if name_ in report},
                }
                if name in SENTENCE_QUERY_VARIANTS and seed == args.seeds[0]:
                    sentence_answers = sentence_queries(run_dir, manifests, args.validation_style)
            if not seeds:
                continue
            result = {
                "recipe": recipe, "note": note, "overrides": overrides, "text_tower": tower, **provenance,
                "train_images": report["train_images"], "train_concepts": report["train_concepts"],
                "train_styles": report["train_styles"], "evaluated": report["evaluated"],
                "seeds": seeds, "rsum": rsum_summary(seeds),
            }
            if name in SENTENCE_QUERY_VARIANTS and args.seeds[0] in map(int, seeds):
                result["sentence_queries"] = sentence_answers
            summary["results"][key] = result
            save(summary, args)
            figures = result["rsum"].get("validation", {}).get("global")
            if figures:
                print(f"{key}: validation rsum {spread_text(figures)} over {figures['n']} seed(s)", flush=True)
    return summary


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """A hash of the training code's files: equal exactly when the code is (read once per process:
    every row's staleness compares with it)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / MEASURED_CODE).rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def measured_at() -> dict:
    """What the figures were measured on: the commit (for a reader) and the code's fingerprint (to
    tell when they go stale, with or without the repository's history)."""
    from measure import commit

    return {"commit": commit(ROOT), "code": code_fingerprint()}


def staleness(result: dict, name: str) -> str | None:
    """Why a result no longer describes this checkout's code, or None when it does."""
    if "seeds" not in result:
        return "measured with one seed before the validation split"
    if result["code"] != code_fingerprint():
        return f"the training code changed since {result['commit']}"
    variant = next((v for v in VARIANTS if v[0] == name.split(" + ")[0]), None)
    if variant is None or (variant[1], variant[2]) != (result["recipe"], result["overrides"]):
        return f"its recipe changed since {result['commit']}"
    return None


def mean_and_spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (None with one value: no spread is known)."""
    import statistics

    return {"mean": round(statistics.fmean(values), 2), "n": len(values),
            "spread": round(statistics.stdev(values), 2) if len(values) > 1 else None}


def rsum_summary(seeds: dict) -> dict:
    """rsum's mean ± spread over the seeds, per evaluated set and output."""
    first = next(iter(seeds.values()))["figures"]
    return {set_: {output: mean_and_spread([run["figures"][set_][output]["rsum"] for run in seeds.values()])
                   for output in outputs}
            for set_, outputs in first.items()}


def spread_text(figures: dict | None) -> str:
    if figures is None:
        return "—"
    if figures["spread"] is None:
        return f"{figures['mean']:.1f}"
    return f"{figures['mean']:.1f} ± {figures['spread']:.1f}"


def describe(args: argparse.Namespace, manifests: list[Path]) -> dict:
    from xmodal import settings

    return {
        "budget": f"{args.epochs} epochs" if args.epochs else f"{args.minutes} min", "data": [str(m) for m in manifests],
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "python": sys.version.split()[0],
        "data_dir": str(settings.data_dir()), "seeds": list(args.seeds),
        "validation_style": args.validation_style, "unseen_concepts": args.unseen_concepts,
    }


def previous_summary(args: argparse.Namespace) -> dict:
    """A run replaces the variants it measures and keeps the others' figures (shown stale when
    they were measured on other code)."""
    if args.out.exists():
        return {"results": json.loads(args.out.read_text())["results"]}
    return {"results": {}}


def save(summary: dict, args: argparse.Namespace) -> None:
    """The JSON, and docs/results.md rendered from it (benchmarks/render_docs.py) when it is the
    repository's result."""
    from render_docs import RESULTS, blocks_of, render

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    if args.out.resolve() == (RESULTS / "recipes.json").resolve():
        render(blocks_of("recipes.json"))


def sentence_queries(run_dir: Path, manifests: list[Path], validation_style: str, k: int = 3) -> dict[str, list[str]]:
    """Each of SENTENCE_QUERIES against the validation images: the labels of the top k concepts."""
    import numpy as np
    import torch

    from xmodal.manifest import read_manifest
    from xmodal.training.run import load_run
    from xmodal.training.splits import split_rows
    from xmodal.training.train import Trainee, embed_image_set, embed_texts, load_features

    model, tokenizer, config = load_run(run_dir)
    splits = split_rows((row for m in manifests for row in read_manifest(m)), validation_style=validation_style,
                        unseen_concepts=config.get("unseen_concepts", 0.0))
    _, rows = splits.held_out()
    images = load_features(rows, config, model.image.backbone, "validation features", torch.device("cpu"))
    image_vectors = embed_image_set(Trainee(model, images, torch.device("cpu")))["global"]
    text_vectors = embed_texts(model, tokenizer, SENTENCE_QUERIES)["global"]
    answers = {}
    for query, vector in zip(SENTENCE_QUERIES, text_vectors):
        labels: list[str] = []
        for index in np.argsort(-(image_vectors @ vector)):
            label = images.rows[index].captions[0]
            if label not in labels:
                labels.append(label)
            if len(labels) == k:
                break
        answers[query] = labels
    return answers


def rsum_of(result: dict, set_: str, output: str = "global") -> dict | None:
    """A result's rsum (mean, spread, n) on one set; a result from before the splits has only
    its single-seed test figure."""
    if "seeds" in result:
        return result["rsum"].get(set_, {}).get(output)
    if set_ == "test" and output in result.get("test", {}):
        return {"mean": result["test"][output]["rsum"], "spread": None, "n": 1}
    return None


def table_row(name: str, output: str, result: dict) -> str:
    cells = [spread_text(rsum_of(result, set_, output)) for set_ in SETS]
    test = result["seeds"][next(iter(result["seeds"]))]["figures"].get("test", {}).get(output) if "seeds" in result \
        else result["test"][output]
    recall = [f"{test[d][f'R@{k}']:.1f}" for d in ("image_to_text", "text_to_image") for k in (1, 10)] if test else ["—"] * 4
    seeds = len(result["seeds"]) if "seeds" in result else 1
    stale = staleness(result, name)
    provenance = f"{result.get('commit', '?')}" + (f" **stale**: {stale}" if stale else "")
    return f"| {name} | {output} | " + " | ".join(f"**{c}**" if i == 0 else c for i, c in enumerate(cells)) \
        + " | " + " | ".join(recall) + f" | {seeds} | {provenance} |"


def compare(better: dict | None, baseline: dict | None) -> str | None:
    """Whether `better`'s mean rsum beats `baseline`'s by more than their seeds' spreads together."""
    if better is None or baseline is None:
        return None
    gap = better["mean"] - baseline["mean"]
    if better["spread"] is None or baseline["spread"] is None:
        return f"not shown: {min(better['n'], baseline['n'])} seed, so no spread to compare the gap ({gap:+.1f}) with"
    margin = better["spread"] + baseline["spread"]
    if gap > margin:
        return f"holds here (gap {gap:+.1f} > the spreads' sum {margin:.1f})"
    if gap < -margin:
        return f"does not hold here (gap {gap:+.1f}, beyond the spreads' sum {margin:.1f})"
    return f"not shown: the gap {gap:+.1f} is within the spreads' sum {margin:.1f}"


def claim_lines(results: dict, tower: str) -> list[str]:
    """The papers' claims, judged on the validation set's rsum (the test set is only reported)."""
    def figures(name: str, output: str = "global") -> dict | None:
        result = results.get(variant_key(name, tower))
        return rsum_of(result, "validation", output) if result is not None else None

    lines = []
    claims = [
        ("instance loss + ranking beats ranking alone", "dualpath", "global", "vsepp", "global"),
        ("HBTR beats the plain hardest-negative triplet", "hbtr", "global", "vsepp", "global"),
        ("HBTR (centroid margin 0.5) beats the plain hardest-negative triplet", "hbtr_wide", "global", "vsepp", "global"),
        ("re-ranking the top 20 with cran's pair scorer beats its first stage alone", "cran", "rerank@20", "cran", "global"),
        ("re-ranking the top 20 with mcsm's pair scorer beats its first stage alone", "mcsm", "rerank@20", "mcsm", "global"),
        ("two-level fusion beats the concept level alone", "mthcn", "global", "mthcn", "concept"),
        ("two-level fusion beats the exterior level alone", "mthcn", "global", "mthcn", "exterior"),
    ]
    for claim, better, better_output, baseline, baseline_output in claims:
        a, b = figures(better, better_output), figures(baseline, baseline_output)
        verdict = compare(a, b)
        if verdict is not None:
            lines.append(f"- {claim}: {better} {better_output} {spread_text(a)} vs {baseline} {baseline_output} "
                         f"{spread_text(b)} — {verdict}.")
    return lines


def markdown(summary: dict) -> str:
    results = summary["results"]
    current = [r for r in results.values() if "seeds" in r]
    first = current[0] if current else next(iter(results.values()))
    lines = [
        "# Results",
        "",
        f"Written by `benchmarks/recipes.py` from `benchmarks/results/recipes.json` (budget: {summary['budget']} "
        f"of training per variant and seed, {summary['machine']}, CPU).",
        "",
        "**Splits** (`training/splits.py`). Every choice (a recipe's settings, the claims below, the "
        "default model, the INT8 gate) is made on the *validation* set; the *test* set is reported, "
        "never chosen on. What each set holds that training did not:",
        "",
    ]
    if current:
        evaluated = first["evaluated"]
        lines += [f"- trained: {', '.join(first['train_styles'])} ({first['train_images']} images, "
                  f"{first['train_concepts']} concepts)"]
        lines += [f"- {SETS[name]}: {', '.join(held['styles'])} ({held['images']} images, {held['concepts']} concepts)"
                  for name, held in evaluated.items()]
        lines += ["", f"The validation and test sets are *drawing styles* no run trains on; their concepts are "
                  f"trained in other styles. The *unseen concepts* ({100 * summary['unseen_concepts']:.0f} % of "
                  "concepts, by a stable hash of the concept key) are trained in no style: those sets measure "
                  "things the model never saw. Each image is ranked against its set's concept labels."]
    else:
        lines += ["No result measured with the splits yet: every row below is stale."]
    lines += [
        "",
        f"Each figure is the mean ± sample standard deviation over the seeds ({len(summary.get('seeds', SEEDS))} "
        "planned per variant; the `seeds` column says how many ran). rsum = R@1+R@5+R@10 both ways; the R@K "
        "columns are the test set's, first seed. A row measured on other training code than this checkout's "
        "is marked **stale** with the reason; its figures are not comparable with the others'.",
        "",
        "| variant | output | validation rsum | validation unseen | test rsum | test unseen | test i→t R@1 | "
        "R@10 | t→i R@1 | R@10 | seeds | commit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        outputs = result["rsum"].get("test") or result["rsum"].get("validation", {}) if "seeds" in result else result["test"]
        for output in outputs:
            lines.append(table_row(name, output, result))
    lines += ["", "Variants:", ""]
    lines += [f"- `{name}`: {result['note']} (recipe `{result['recipe']}`, text tower "
              f"{TEXT_TOWERS[result_tower(result)][0]})" for name, result in results.items()]
    lines += ["", "## The papers' claims, here", "",
              "Judged on the validation set: a claim holds when its gap in mean rsum exceeds the two "
              "variants' spreads added together.", ""]
    for tower, (label, _) in TEXT_TOWERS.items():
        claims = claim_lines(results, tower)
        if claims:
            lines += [f"With the {label}:", "", *claims, ""]
    lines += default_model_lines(results)
    lines += rerank_lines()
    queries = {name: result["sentence_queries"] for name, result in results.items() if "sentence_queries" in result}
    if queries:
        lines += ["## Sentence queries", "",
                  "Examples, not a figure: queries that are not emoji labels, against the validation images "
                  "(stale rows: the held-out test images); the labels of the top 3 concepts.", ""]
        for query in SENTENCE_QUERIES:
            lines += [f"**{query}**", "", "| variant | top 3 |", "| --- | --- |"]
            lines += [f"| {name} | {'; '.join(answers.get(query, []))} |" for name, answers in queries.items()]
            lines.append("")
    return "\n".join(lines)


def rerank_lines() -> list[str]:
    """The served second stage's figures, from benchmarks/rerank.py's last run, if there is one."""
    path = ROOT / "benchmarks" / "results" / "rerank.json"
    if not path.exists():
        return []
    from rerank import markdown as rerank_markdown

    return rerank_markdown(json.loads(path.read_text()))


def default_model_lines(results: dict) -> list[str]:
    """The rule the default model is chosen by (validation rsum; a tie within the seeds' spreads goes
    to the tower that reads sentences), applied to these figures, and whether the demo follows it."""
    from xmodal.demo import DEMO_RUN

    figures = {name: rsum_of(result, "validation") for name, result in results.items()
               if "seeds" in result and not staleness(result, name)}
    figures = {name: f for name, f in figures.items() if f is not None}
    lines = ["## The default model", ""]
    if not figures:
        return lines + ["No current result on the validation set: the default model is not chosen from these figures "
                        f"(`make demo` trains `{DEMO_RUN}`, `xmodal/demo.py`).", ""]
    best = max(figures, key=lambda name: figures[name]["mean"])
    choice = best
    stale = [name for name in results if name not in figures]
    lines.append(f"Chosen among the {len(figures)} variants measured on this code"
                 + (f"; the {len(stale)} stale ones ({', '.join(f'`{name}`' for name in stale)}) are not "
                    "candidates until they are run again." if stale else "."))
    lines.append("")
    lines.append(f"The best on the validation set is `{best}` (rsum {spread_text(figures[best])}).")
    readers = [name for name in figures if result_tower(results[name]).startswith("minilm")]
    if readers and best not in readers:
        reader = max(readers, key=lambda name: figures[name]["mean"])
        verdict = compare(figures[best], figures[reader])
        if verdict.startswith("holds"):
            lines[-1] += f" The best with the sentence encoder, `{reader}` ({spread_text(figures[reader])}), is behind it: {verdict}."
        else:
            choice = reader
            lines[-1] += (f" The best with the sentence encoder, `{reader}` ({spread_text(figures[reader])}), is not "
                          f"shown to be worse ({verdict}), so the default is `{reader}`: the tower that reads sentences.")
    lines.append("")
    if choice.replace(" + ", "-") == DEMO_RUN:
        lines.append(f"`make demo` trains it (`xmodal/demo.py`: run `{DEMO_RUN}`) and `xmodal export` exports it by default.")
    else:
        lines.append(f"**`make demo` trains `{DEMO_RUN}` (`xmodal/demo.py`), not this choice: update it.**")
    return lines + [""]


def result_tower(result: dict) -> str:
    """The text tower of a result; results saved before towers had names carry only the encoder."""
    return result.get("text_tower", result.get("text_encoder", "glove_cnn"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget per variant, in time")
    parser.add_argument("--epochs", type=int, help="training budget per variant in epochs instead: equal work "
                        "whatever else the machine is doing (the fair choice on a shared machine)")
    parser.add_argument("--data", action="append", help="corpus names or manifests (default emoji + iconify)")
    parser.add_argument("--runs", type=Path, default=Path("xmodal-data/runs/benchmark"))
    parser.add_argument("--only", nargs="+", help="run only these variants")
    parser.add_argument("--text-towers", nargs="+", default=list(TEXT_TOWERS), choices=list(TEXT_TOWERS),
                        help="run every variant with each of these text towers (minilm_top2: only "
                        f"{', '.join(TOWER_VARIANTS['minilm_top2'])})")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="train each variant with each seed")
    parser.add_argument("--validation-style", default=recipe_config("infonce")["validation_style"],
                        help="the trained style held out as the validation set (training/splits.py)")
    parser.add_argument("--unseen-concepts", type=float, default=UNSEEN_CONCEPTS,
                        help="the share of concepts no style trains on, evaluated apart")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--resume", action="store_true", help="continue killed runs from their last epoch and "
                        "keep finished ones (default: train every variant afresh)")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: rebuild the figures from the finished runs in --runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recipes.json")
    args = parser.parse_args()
    args.data = args.data or ["emoji", "iconify"]
    summary = run(args)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
