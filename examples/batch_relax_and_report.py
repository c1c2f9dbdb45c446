"""Batch IS2RS relaxations with uncertainties on Dask into an ase.db, then the IS2RS report.

Run after `make demo`:  python examples/batch_relax_and_report.py [--demo-dir demo_output]

relax_batch relaxes the in-domain and out-of-domain IS2RS initial structures (in-process Dask
cluster, one calculator per worker built by NequIPLTAUFactory) and writes one row per system as it
finishes; a second call skips every system already in the database. The analysis is the one of
`ltau report`: RMSD to the EMT-relaxed reference vs the uncertainty statistics (paper Fig. 4).
"""
import argparse
import json
from pathlib import Path

from ltau_ase.core.jsonable import to_jsonable
from ltau_ase.datasets import read_split
from ltau_ase.is2rs import records_table, uq_rmsd_analysis
from ltau_ase.plots import plot_rmsd_vs_uq
from ltau_ase.nequip.backend import NequIPLTAUFactory
from ltau_ase.simulate.batch import load_results, relax_batch

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--demo-dir", type=Path, default=Path("demo_output"), help="output of `make demo`")
parser.add_argument("--max-systems", type=int, default=None, help="systems per domain (default: all)")
parser.add_argument("--steps", type=int, default=100, help="maximum optimizer steps (100)")
parser.add_argument("--workers", type=int, default=1, help="Dask workers, one model each (1)")
parser.add_argument("--output", type=Path, default=None, help="output folder (default <demo-dir>/examples/batch)")
args = parser.parse_args()
out = args.output or args.demo_dir / "examples" / "batch"
out.mkdir(parents=True, exist_ok=True)

initial, references = [], []
for split, group in (("is2rs_id", "in_domain"), ("is2rs_ood", "out_of_domain")):
    starts, relaxed = read_split(args.demo_dir / "data", split)
    for atoms, ref in list(zip(starts, relaxed))[:args.max_systems]:
        for a in (atoms, ref):  # relax_batch identifies systems by info["name"]
            a.info.update(name=a.info["system"], group=group)
        initial.append(atoms)
        references.append(ref)

factory = NequIPLTAUFactory(model_path=str(args.demo_dir / "models" / "member1" / "run" / "last.ckpt"),
                            estimator_path=str(args.demo_dir / "estimator.ltau"),
                            chemical_species_to_atom_type_map=True)  # the demo's type names are symbols
db = out / "is2rs.db"
for attempt in ("first run", "re-run"):
    counts = relax_batch(initial, db, factory, optimizer="oc20", fmax=0.05, steps=args.steps,
                         references=references, n_workers=args.workers, progress=False)
    print(f"{attempt}: {counts}")

records = load_results(db)
for r in records:  # RelaxationRecord objects
    print(f"  {r.name:45s} {r.group:13s} {r.status:11s} {r.nsteps:3d} steps "
          f"uq initial/max/final {r.uq_initial:.3f}/{r.uq_max:.3f}/{r.uq_final:.3f}")
table, missing = records_table(records)  # failed relaxations skipped; references stored in the database
analysis = uq_rmsd_analysis(table, groups=["in_domain", "out_of_domain"], threshold=0.5)
png = plot_rmsd_vs_uq(analysis["binned"], out / "rmsd_vs_uq.png", threshold=0.5)
report = {"db": str(db), "failed": [r.name for r in records if r.status == "failed"],
          "missing_references": missing, "analysis": analysis, "systems": table}
(out / "is2rs_metrics.json").write_text(json.dumps(to_jsonable(report), indent=2))
for group, entry in analysis["groups"].items():
    rho = ", ".join(f"{s} {v['spearman']:.3f}" for s, v in entry["stats"].items())
    print(f"{group}: n={entry['n_systems']} ADwT={entry['adwt']:.3f} mean RMSD={entry['mean_rmsd']:.3f} Å; "
          f"Spearman(UQ, RMSD): {rho}")
print(f"wrote {png} and {out / 'is2rs_metrics.json'}")
