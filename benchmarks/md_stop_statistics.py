"""MD stop statistics side by side on the shift benchmark's cached MD runs (issue 11, item 5).

    python benchmarks/md_stop_statistics.py --output shift_output [--md-model-epochs 100] [--quick]

Reads the runs that ``benchmarks/shift.py`` cached in ``--output`` (``raw/md_*.pkl``; nothing is
simulated: the runs never stop, so every stop rule can be scored on their complete traces) and scores
candidate stop statistics built from the MD model's per-atom distance-aware expected error (EE, eV/Å) and
distance ratio (r): the raw max over atoms, the max of the two each over its in-domain median, their
product, each atom over its element's in-domain quantile (:func:`ltau_ase.simulate.observers.element_scales`),
moving means, a CUSUM and the jump over the run's own recent median. Every normalisation constant and
threshold comes from in-domain runs only, as in the benchmark: each in-domain run's from the other runs
(leave one out), the hot runs' from all; references cut at their own breakdown (first step whose true
max-atom error exceeds the bound). Thresholds: :func:`ltau_ase.simulate.observers.stop_threshold`
(conformal α = 0.05, Gumbel α = 0.05 and 0.01). Also a sensitivity analysis over the physical bound.
Output: ``md_stop_statistics.json`` in ``--output`` and a table on stdout.

``--held-out-runs N`` also simulates N new in-domain and N new hot runs (the benchmark's MD task and MD
model, new random streams; cached in ``raw/md_heldout_*.pkl``) and scores the main statistics on them
with scales and thresholds fitted on the cached in-domain runs only: a check free of the choice of
statistic, which was made looking at the cached hot runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Sequence

import numpy as np

Trace = Callable[[dict], np.ndarray]
Factory = Callable[[list], Trace]  # fit on reference runs -> a run's (steps,) trace


#: random streams of the held-out runs (the benchmark's own MD groups use 101-103 + j)
HELD_OUT_STREAMS = {"in_domain": 202, "hot": 203}


def held_out_md(output: Path, cfg, md_train, n: int) -> dict[str, list]:
    """n new in-domain and n new hot runs (the benchmark's ``_md_task``), cached in ``raw/md_heldout_*.pkl``."""
    import pickle

    from ltau_ase.demo import shift as S

    plan = {"heldout_in_domain": (cfg.settings.train_temperature, cfg.md_steps_in_domain, HELD_OUT_STREAMS["in_domain"],
                                  cfg.md_emt_stride_in_domain),
            "heldout_hot": (cfg.md_hot_temperatures[-1], cfg.md_steps_hot, HELD_OUT_STREAMS["hot"], cfg.md_emt_stride_hot)}
    runs = {}
    for group, (temp, steps, stream, stride) in plan.items():
        path = output / "raw" / f"md_{group}_{n}.pkl"
        if not path.is_file():
            starts = S.md_start_structures(cfg, n, stream)
            tasks = [(i, a, temp, steps, [cfg.seed, stream, i, 7], cfg.md_error_bound, cfg.md_after_breakdown, stride)
                     for i, a in enumerate(starts)]
            res = S._pool_map(cfg, md_train, S._md_task, tasks, f"MD {group}")
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps(res))  # our own file, written just now
            tmp.replace(path)
        runs[group] = pickle.loads(path.read_bytes())
    return runs


def per_atom_runs(output: Path, cfg, held_out: int = 0) -> dict[str, list[dict]]:
    """Per run: ``numbers`` (N,), ``true_max_error`` (steps,), ``expected_error`` and ``distance_ratio`` (steps, N)."""
    from ltau_ase.demo import shift as S

    data = S.stage_data(cfg, output, True)
    train = S.stage_train(cfg, output, data, True)
    md_train = S.stage_md_model(cfg, output, data, train, True)
    md = S.stage_md(cfg, output, md_train, True)
    if held_out:
        md = md | held_out_md(output, cfg, md_train, held_out)
    aware = S.md_estimators(cfg, data, md_train)["aware"]
    runs = {}
    for group, group_runs in md.items():
        runs[group] = []
        for r in group_runs:
            d = r["descriptors"]
            p = aware.predict(d.reshape(-1, d.shape[-1]), atomic_numbers=np.tile(r["numbers"], d.shape[0]))
            runs[group].append({"numbers": np.asarray(r["numbers"]), "true_max_error": np.asarray(r["true_max_error"]),
                                "expected_error": p["expected_error"].reshape(d.shape[:2]),
                                "distance_ratio": p["distance_ratio"].reshape(d.shape[:2])})
    return runs


def breakdown(run: dict, bound: float) -> int | None:
    over = np.flatnonzero(run["true_max_error"] > bound)
    return int(over[0]) if over.size else None


def statistics(bound: float, quantile: float = 0.99) -> dict[str, Factory]:
    from ltau_ase.simulate.observers import element_normalised, element_scales

    def cut(x: np.ndarray, run: dict) -> np.ndarray:
        b = breakdown(run, bound)
        return x if b is None else x[:b]

    def frame_max(key: str) -> Factory:
        return lambda refs: (lambda r: r[key].max(axis=1))

    def over_median(kind: str) -> Factory:
        def fit(refs):
            m = {k: np.median(np.concatenate([cut(r[k].max(axis=1), r) for r in refs]))
                 for k in ("expected_error", "distance_ratio")}
            if kind == "max":
                return lambda r: np.maximum(r["expected_error"] / m["expected_error"],
                                            r["distance_ratio"] / m["distance_ratio"]).max(axis=1)
            return lambda r: (r["expected_error"] / m["expected_error"] * r["distance_ratio"]
                              / m["distance_ratio"]).max(axis=1)
        return fit

    def per_element(key: str, q: float = quantile) -> Factory:
        def fit(refs):
            vals = [cut(r[key], r) for r in refs]
            scales = element_scales(vals, [r["numbers"] for r in refs], q)
            pooled = float(np.quantile(np.concatenate([v.ravel() for v in vals]), q))
            return lambda r: element_normalised(r[key], r["numbers"], scales, default=pooled).max(axis=1)
        return fit

    def max_of(a: Factory, b: Factory) -> Factory:
        def fit(refs):
            fa, fb = a(refs), b(refs)
            return lambda r: np.maximum(fa(r), fb(r))
        return fit

    def moving_mean(base: Factory, w: int) -> Factory:
        def fit(refs):
            f = base(refs)

            def trace(r):
                x = f(r)
                c = np.concatenate([[0.0], np.cumsum(x)])
                end = np.arange(1, x.size + 1)
                return (c[end] - c[np.maximum(end - w, 0)]) / np.minimum(end, w)
            return trace
        return fit

    def cusum(base: Factory, q: float = 0.9) -> Factory:
        def fit(refs):
            f = base(refs)
            k = np.quantile(np.concatenate([cut(f(r), r) for r in refs]), q)  # in-domain reference level

            def trace(r):
                out, acc = [], 0.0
                for v in f(r):
                    acc = max(0.0, acc + v - k)
                    out.append(acc)
                return np.array(out)
            return trace
        return fit

    def jump(base: Factory, w: int = 20) -> Factory:
        def fit(refs):
            f = base(refs)

            def trace(r):
                x = f(r)
                return np.array([0.0] + [x[i] - np.median(x[max(0, i - w):i]) for i in range(1, x.size)])
            return trace
        return fit

    ee, r = frame_max("expected_error"), frame_max("distance_ratio")
    ee_el, r_el = per_element("expected_error"), per_element("distance_ratio")
    stats = {"EE": ee, "r": r, "max(EE, r) over medians": over_median("max"), "EE x r over medians": over_median("prod"),
             f"EE / element q{quantile:g}": ee_el, f"r / element q{quantile:g}": r_el,
             "max of the two per-element": max_of(ee_el, r_el),
             "EE / element q0.9": per_element("expected_error", 0.9),
             "EE / element q0.999": per_element("expected_error", 0.999)}
    for w in (10, 25, 50):
        stats[f"mean{w}(EE)"] = moving_mean(ee, w)
        stats[f"mean{w}(EE / element)"] = moving_mean(ee_el, w)
    stats.update({"CUSUM(EE)": cusum(ee), "CUSUM(r)": cusum(r), "CUSUM(max(EE, r))": cusum(over_median("max")),
                  "jump20(EE)": jump(ee), "jump20(r)": jump(r)})
    return stats


def evaluate(factory: Factory, in_domain: list, hot: list, bound: float, method: str, alpha: float,
             patience: int = 1, on_time: int = 10) -> dict:
    from ltau_ase.shift_metrics import stop_outcomes
    from ltau_ase.simulate.observers import stop_threshold

    def refs_of(runs, f):
        return [f(r)[:breakdown(r, bound)] if breakdown(r, bound) is not None else f(r) for r in runs]

    thr_in, traces_in = [], []
    for i in range(len(in_domain)):
        others = in_domain[:i] + in_domain[i + 1:]
        f = factory(others)
        thr_in.append(stop_threshold(refs_of(others, f), alpha, patience, method))
        traces_in.append(f(in_domain[i]))
    f = factory(in_domain)
    thr = stop_threshold(refs_of(in_domain, f), alpha, patience, method)
    o_in = stop_outcomes(traces_in, [r["true_max_error"] for r in in_domain], thr_in, bound, patience, on_time)
    o_hot = stop_outcomes([f(r) for r in hot], [r["true_max_error"] for r in hot], thr, bound, patience, on_time)
    delays = [d for d in o_hot["delay"] if d is not None]
    return {"threshold": thr, "in_domain_false_alarms": o_in["n_false_alarms"], "in_domain_runs": o_in["n_runs"],
            "in_domain_broken": o_in["n_broken"], "hot_broken": o_hot["n_broken"], "hot_on_time": o_hot["n_on_time"],
            "hot_before": sum(d < 0 for d in delays), "hot_within": sum(0 <= d <= on_time for d in delays),
            "hot_later": sum(d > on_time for d in delays), "hot_never": o_hot["n_missed"],
            "hot_stops_in_unbroken": sum(s is not None and b is None for s, b in zip(o_hot["stop"], o_hot["breakdown"])),
            "hot_stop": o_hot["stop"], "hot_breakdown": o_hot["breakdown"]}


def evaluate_held_out(factory: Factory, reference: list, in_domain: list, hot: list, bound: float, method: str,
                      alpha: float, on_time: int = 10) -> dict:
    """Scales and threshold from ``reference`` (cut at breakdown) only; outcomes on new runs."""
    from ltau_ase.shift_metrics import stop_outcomes
    from ltau_ase.simulate.observers import stop_threshold

    f = factory(reference)
    refs = [f(r)[:breakdown(r, bound)] if breakdown(r, bound) is not None else f(r) for r in reference]
    thr = stop_threshold(refs, alpha, 1, method)
    o_in = stop_outcomes([f(r) for r in in_domain], [r["true_max_error"] for r in in_domain], thr, bound, 1, on_time)
    o_hot = stop_outcomes([f(r) for r in hot], [r["true_max_error"] for r in hot], thr, bound, 1, on_time)
    delays = [d for d in o_hot["delay"] if d is not None]
    return {"threshold": thr, "in_domain_false_alarms": o_in["n_false_alarms"], "in_domain_runs": o_in["n_runs"],
            "in_domain_broken": o_in["n_broken"], "in_domain_stop": o_in["stop"], "in_domain_breakdown": o_in["breakdown"],
            "hot_broken": o_hot["n_broken"], "hot_on_time": o_hot["n_on_time"],
            "hot_before": sum(d < 0 for d in delays), "hot_within": sum(0 <= d <= on_time for d in delays),
            "hot_later": sum(d > on_time for d in delays), "hot_never": o_hot["n_missed"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/md_stop_statistics.py", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="a benchmarks/shift.py output directory with cached MD runs")
    parser.add_argument("--quick", action="store_true", help="the --quick sizes of benchmarks/shift.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--md-model-epochs", type=int, default=None, help="as given to benchmarks/shift.py")
    parser.add_argument("--held-out-runs", type=int, default=0,
                        help="also simulate this many new in-domain and hot runs and score on them (default 0)")
    args = parser.parse_args(argv)
    if args.held_out_runs < 0:
        print(f"error: --held-out-runs must be >= 0, got {args.held_out_runs}", file=sys.stderr)
        return 2
    from ltau_ase.demo.shift import ShiftBenchConfig, md_plan

    out = Path(args.output)
    try:
        cfg = ShiftBenchConfig.preset(args.quick, seed=args.seed, md_model_epochs=args.md_model_epochs, workers=1)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    missing = [g for g in md_plan(cfg) if not (out / "raw" / f"md_{g}.pkl").is_file()]
    if missing:
        print(f"error: {out} has no cached MD runs for {missing}; run benchmarks/shift.py there first", file=sys.stderr)
        return 2
    runs = per_atom_runs(out, cfg, args.held_out_runs)
    in_domain = runs[f"T{cfg.settings.train_temperature:g}"]
    hot = runs[f"T{cfg.md_hot_temperatures[-1]:g}"]
    rules = [("conformal", 0.05), ("gumbel", 0.05), ("gumbel", 0.01)]
    results: dict = {"bound": cfg.md_error_bound, "statistics": {}, "sensitivity": {}}
    print("| statistic | rule | threshold | in-domain false alarms | hot on time (before / 0-10 after / later / never) |")
    print("|---|---|---|---|---|")
    for name, factory in statistics(cfg.md_error_bound).items():
        for method, alpha in rules:
            try:
                o = evaluate(factory, in_domain, hot, cfg.md_error_bound, method, alpha)
            except ValueError as exc:
                o = {"error": str(exc)}
            results["statistics"][f"{name} | {method} {alpha:g}"] = o
            if "error" in o:
                print(f"| {name} | {method} α={alpha:g} | n/a: {o['error']} | | |")
                continue
            print(f"| {name} | {method} α={alpha:g} | {o['threshold']:.4g} | {o['in_domain_false_alarms']}/"
                  f"{o['in_domain_runs']} | {o['hot_on_time']}/{o['hot_broken']} ({o['hot_before']} / {o['hot_within']}"
                  f" / {o['hot_later']} / {o['hot_never']}) |")
    # patience 3 (3 consecutive steps above) for the per-element statistic
    o = evaluate(statistics(cfg.md_error_bound)["EE / element q0.99"], in_domain, hot, cfg.md_error_bound, "gumbel", 0.01, 3)
    results["statistics"]["EE / element q0.99 | gumbel 0.01 | patience 3"] = o
    print(f"| EE / element q0.99, patience 3 | gumbel α=0.01 | {o['threshold']:.4g} | {o['in_domain_false_alarms']}/"
          f"{o['in_domain_runs']} | {o['hot_on_time']}/{o['hot_broken']} |")
    print("\nsensitivity to the physical bound (gumbel α=0.01; hot runs end md_after_breakdown steps after the "
          f"{cfg.md_error_bound:g} eV/Å crossing, so higher bounds are reached by few of them):")
    for bound in (0.8, 1.0, 1.2, 1.5, 2.0, 3.0):
        stats = statistics(bound)
        for name in ("EE", "EE / element q0.99"):
            o = evaluate(stats[name], in_domain, hot, bound, "gumbel", 0.01)
            results["sensitivity"][f"{bound:g} | {name}"] = o
            print(f"  bound {bound:g} eV/Å, {name}: in-domain broken {o['in_domain_broken']}, false alarms "
                  f"{o['in_domain_false_alarms']}/{o['in_domain_runs']}; hot runs reaching it {o['hot_broken']}, on time "
                  f"{o['hot_on_time']}, stops in hot runs that never reach it {o['hot_stops_in_unbroken']}")
    if args.held_out_runs:
        new_in, new_hot = runs["heldout_in_domain"], runs["heldout_hot"]
        print(f"\nheld-out runs ({args.held_out_runs} in-domain, {args.held_out_runs} hot; new random streams), "
              "scales and thresholds from the cached in-domain runs only:")
        results["held_out"] = {"in_domain_breakdown": [breakdown(r, cfg.md_error_bound) for r in new_in],
                               "hot_breakdown": [breakdown(r, cfg.md_error_bound) for r in new_hot], "statistics": {}}
        print("| statistic | rule | threshold | new in-domain false alarms (broken by themselves) | new hot on time "
              "(before / 0-10 after / later / never) |")
        print("|---|---|---|---|---|")
        stats = statistics(cfg.md_error_bound)
        for name in ("EE", "r", "EE / element q0.99", "r / element q0.99", "max of the two per-element"):
            for method, alpha in rules:
                o = evaluate_held_out(stats[name], in_domain, new_in, new_hot, cfg.md_error_bound, method, alpha)
                results["held_out"]["statistics"][f"{name} | {method} {alpha:g}"] = o
                print(f"| {name} | {method} α={alpha:g} | {o['threshold']:.4g} | {o['in_domain_false_alarms']}/"
                      f"{o['in_domain_runs']} ({o['in_domain_broken']}) | {o['hot_on_time']}/{o['hot_broken']} "
                      f"({o['hot_before']} / {o['hot_within']} / {o['hot_later']} / {o['hot_never']}) |")
    (out / "md_stop_statistics.json").write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {out / 'md_stop_statistics.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
