"""Distribution-shift splits of the EMT catalysis domain (train at one temperature, test under shift).

Built from the same adsorbate/slab systems as :mod:`ltau_ase.datasets.catalysis` (OC20 tags, bottom
layers fixed, EMT labels with unconstrained forces), arranged for the shift benchmark
(``benchmarks/shift.py``):

* ``train`` / ``val``: in-domain systems (metals ``metals_in``, adsorbates ``adsorbates_in``, facet
  ``facet_in``): frames of the EMT relaxation trajectory plus Langevin MD frames at
  ``train_temperature`` (K) started from the EMT-relaxed structure.
* ``calibration``: new in-domain systems, MD frames at ``train_temperature`` only.
* ``calibration_mild``: new in-domain systems, MD frames at ``mild_temperature`` (the one milder shift
  a calibration may use).
* ``test_<domain>`` for every domain of :data:`SHIFT_DOMAINS`, MD frames only:

  ``in_domain`` (in-domain systems at ``train_temperature``), ``T<t>`` for every ``t`` of
  ``hot_temperatures`` (same kind of systems, hotter MD), ``adsorbate`` (held-out adsorbates on
  in-domain metals), ``facet`` (in-domain metals and adsorbates on the held-out facet), ``element``
  (held-out metals with in-domain adsorbates; their metal atoms are elements never seen in training).
* ``is2rs_calibration``: in-domain IS2RS pairs for fitting a relaxation-failure model.
* ``is2rs_<domain>`` for ``in_domain``, ``adsorbate``, ``facet`` and ``element``: IS2RS (initial,
  EMT-relaxed) pairs.

Every system draws from ``numpy.random.default_rng([seed, split_index, system_index])``, so splits
are independent of each other's sizes. Frames carry the catalysis ``atoms.info`` keys plus
``shift_domain`` and ``temperature_K`` (MD frames; ``0`` for relaxation frames).
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from ase import Atoms
from ase.calculators.emt import EMT

from ltau_ase.datasets.catalysis import (
    ADSORBATE_FAMILY,
    ADSORBATES,
    FACET_SITES,
    CatalysisSettings,
    SystemSpec,
    _is2rs_system,
    _split_summary,
    check_composition,
    label_with_emt,
    relax_with_emt,
    slab_with_adsorbate,
)
from ltau_ase.simulate.md import thermalized_langevin

IS2RS_DOMAINS = ("in_domain", "adsorbate", "facet", "element")


@dataclass(frozen=True)
class ShiftSettings:
    """Composition, temperatures (K) and sizes of the shift splits.

    Sizes: ``n_<split>`` systems per split; ``md_frames`` MD frames per S2EF system, taken every
    ``md_stride`` steps of 1 fs after ``md_equilibration`` steps; ``relax_frames`` relaxation frames
    per training system.
    """

    metals_in: tuple[str, ...] = ("Cu", "Ag", "Ni", "Pd", "Pt")
    metals_out: tuple[str, ...] = ("Au", "Al")
    adsorbates_in: tuple[str, ...] = ("H", "O", "N", "C", "OH", "CO", "CH", "NH")
    adsorbates_out: tuple[str, ...] = ("NO",)
    facet_in: str = "111"
    facet_out: str = "100"
    slab_sizes: tuple[tuple[int, int, int], ...] = ((2, 2, 3), (2, 2, 4), (3, 3, 3))
    train_temperature: float = 300.0
    mild_temperature: float = 600.0
    hot_temperatures: tuple[float, ...] = (600.0, 1200.0)
    n_train: int = 60
    n_val: int = 6
    n_calibration: int = 20
    n_calibration_mild: int = 10
    n_test: int = 20
    n_is2rs: int = 50
    n_is2rs_calibration: int = 30
    relax_frames: int = 4
    md_frames: int = 6
    md_stride: int = 10
    md_equilibration: int = 20
    friction_per_fs: float = 0.02

    def validate(self) -> None:
        check_composition(self.metals_in + self.metals_out, self.adsorbates_in + self.adsorbates_out)
        if set(self.metals_in) & set(self.metals_out) or set(self.adsorbates_in) & set(self.adsorbates_out):
            raise ValueError("a metal or adsorbate cannot be both seen and held out")
        if not (self.metals_in and self.metals_out and self.adsorbates_in and self.adsorbates_out):
            raise ValueError("every composition list (metals_in/out, adsorbates_in/out) needs at least one entry")
        if self.facet_in == self.facet_out or {self.facet_in, self.facet_out} - set(FACET_SITES):
            raise ValueError(f"facet_in and facet_out must be two different facets of {tuple(FACET_SITES)}")
        for name in ("n_train", "n_val", "n_calibration", "n_calibration_mild", "n_test", "n_is2rs", "n_is2rs_calibration",
                     "md_frames", "md_stride"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        temps = (self.train_temperature, self.mild_temperature, *self.hot_temperatures)
        if min(temps) <= 0:
            raise ValueError(f"temperatures must be > 0 K, got {temps}")

    def test_domains(self) -> tuple[str, ...]:
        return ("in_domain", *(f"T{t:g}" for t in self.hot_temperatures), "adsorbate", "facet", "element")

    def domain_spec(self, domain: str) -> tuple[tuple[str, ...], tuple[str, ...], str, float]:
        """(metals, adsorbates, facet, MD temperature in K) of a domain."""
        if domain == "in_domain":
            return self.metals_in, self.adsorbates_in, self.facet_in, self.train_temperature
        if domain == "mild":
            return self.metals_in, self.adsorbates_in, self.facet_in, self.mild_temperature
        if domain.startswith("T"):
            try:
                t = float(domain[1:])
            except ValueError:
                t = math.nan
            if t not in self.hot_temperatures:
                raise ValueError(f"unknown shift domain {domain!r}: not a temperature of hot_temperatures "
                                 f"{self.hot_temperatures}")
            return self.metals_in, self.adsorbates_in, self.facet_in, t
        if domain == "adsorbate":
            return self.metals_in, self.adsorbates_out, self.facet_in, self.train_temperature
        if domain == "facet":
            return self.metals_in, self.adsorbates_in, self.facet_out, self.train_temperature
        if domain == "element":
            return self.metals_out, self.adsorbates_in, self.facet_in, self.train_temperature
        raise ValueError(f"unknown shift domain {domain!r}; expected mild, one of {self.test_domains()}")


def split_plan(settings: ShiftSettings) -> dict[str, tuple[str, str, int]]:
    """Every split: name -> (kind ``train`` | ``md`` | ``is2rs``, domain, number of systems), in file order."""
    plan = {"train": ("train", "in_domain", settings.n_train), "val": ("train", "in_domain", settings.n_val),
            "calibration": ("md", "in_domain", settings.n_calibration),
            "calibration_mild": ("md", "mild", settings.n_calibration_mild)}
    for domain in settings.test_domains():
        plan[f"test_{domain}"] = ("md", domain, settings.n_test)
    plan["is2rs_calibration"] = ("is2rs", "in_domain", settings.n_is2rs_calibration)
    for domain in IS2RS_DOMAINS:
        plan[f"is2rs_{domain}"] = ("is2rs", domain, settings.n_is2rs)
    return plan


def domain_systems(settings: ShiftSettings, domain: str, n: int, seed: int, stream: int) -> list[SystemSpec]:
    """``n`` systems of a domain: (metal, adsorbate) pairs cycled in a seeded shuffle, random site and size."""
    metals, adsorbates, facet, _ = settings.domain_spec(domain)
    combos = list(itertools.product(metals, adsorbates))
    rng = np.random.default_rng([seed, stream, 10**6])
    order = rng.permutation(len(combos))
    specs = []
    label = "in_domain" if domain in ("in_domain", "mild") else "out_of_domain"
    for i in range(n):
        metal, adsorbate = combos[order[i % len(combos)]]
        sites = FACET_SITES[facet]
        site = sites[int(rng.integers(len(sites)))]
        size = settings.slab_sizes[int(rng.integers(len(settings.slab_sizes)))]
        specs.append(SystemSpec(metal, facet, adsorbate, site, tuple(size), label))
    return specs


def thermal_trajectory(atoms: Atoms, temperature: float, n_frames: int, stride: int, equilibration: int,
                       rng: np.random.Generator, friction_per_fs: float = 0.02) -> list[Atoms]:
    """EMT Langevin MD (1 fs) at ``temperature`` K; ``n_frames`` EMT-labelled frames every ``stride`` steps."""
    work = atoms.copy()
    work.calc = EMT()
    dyn = thermalized_langevin(work, temperature, rng, friction_per_fs=friction_per_fs)
    if equilibration:
        dyn.run(equilibration)
    frames = []
    for _ in range(n_frames):
        dyn.run(stride)
        frames.append(label_with_emt(work))
    return frames


def _tag(frame: Atoms, spec: SystemSpec, name: str, split: str, domain: str, config_type: str,
         temperature: float) -> Atoms:
    frame.info.update(system=name, metal=spec.metal, adsorbate=spec.adsorbate,
                      adsorbate_family=ADSORBATE_FAMILY[spec.adsorbate], facet=spec.facet, site=spec.site,
                      config_type=config_type, split=split, domain=spec.domain, shift_domain=domain,
                      temperature_K=float(temperature))
    return frame


def _catalysis_settings(settings: ShiftSettings) -> CatalysisSettings:
    return CatalysisSettings(slab_sizes=settings.slab_sizes)


def _is2rs_job(args: tuple) -> tuple[Atoms, Atoms, list[dict]]:
    spec, name, split, seed_seq, cat = args
    rejected: list[dict] = []
    a, r = _is2rs_system(spec, name, split, np.random.default_rng(seed_seq), cat, rejected)
    return a, r, rejected


def generate_split(settings: ShiftSettings, split: str, seed: int = 0, progress: bool = False, workers: int = 1
                   ) -> list[Atoms] | tuple[list[Atoms], list[Atoms]]:
    """One split of :func:`split_plan` (frame ids not yet assigned): frames, or (initial, relaxed) lists.

    ``workers`` > 1 computes the EMT references of an IS2RS split in that many processes (the result
    does not depend on it: every system has its own random stream).
    """
    settings.validate()
    plan = split_plan(settings)
    if split not in plan:
        raise ValueError(f"unknown split {split!r}; expected one of {list(plan)}")
    kind, domain, n = plan[split]
    stream = list(plan).index(split)
    _, _, _, temperature = settings.domain_spec(domain)
    cat = _catalysis_settings(settings)
    specs = domain_systems(settings, domain, n, seed, stream)
    frames: list[Atoms] = []
    initial: list[Atoms] = []
    relaxed: list[Atoms] = []
    rejected: list[dict] = []
    if kind == "is2rs" and workers > 1:
        import multiprocessing as mp

        jobs = [(spec, spec.name(split, i), split, [seed, stream, i], cat) for i, spec in enumerate(specs)]
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.imap(_is2rs_job, jobs)
            if progress:
                from tqdm.auto import tqdm

                results = tqdm(results, total=len(jobs), desc=f"EMT {split}", unit="system", leave=False)
            for spec, (a, r, rej) in zip(specs, results):
                name = a.info["system"]
                initial.append(_tag(a, spec, name, split, domain, "is2rs_initial", 0.0))
                relaxed.append(_tag(r, spec, name, split, domain, "is2rs_relaxed", 0.0))
                rejected.extend(rej)
        specs = []
    iterator = specs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(specs, desc=f"EMT {split}", unit="system", leave=False)
    for i, spec in enumerate(iterator):
        rng = np.random.default_rng([seed, stream, i])
        name = spec.name(split, i)
        if kind == "is2rs":
            a, r = _is2rs_system(spec, name, split, rng, cat, rejected)
            initial.append(_tag(a, spec, name, split, domain, "is2rs_initial", 0.0))
            relaxed.append(_tag(r, spec, name, split, domain, "is2rs_relaxed", 0.0))
            continue
        start = slab_with_adsorbate(spec, rng, cat)
        relaxed_frame, trajectory, _ = relax_with_emt(start, cat.trajectory_fmax, cat.trajectory_steps)
        if kind == "train":
            picks = np.unique(np.linspace(0, len(trajectory) - 1, settings.relax_frames).round().astype(int))
            frames.extend(_tag(trajectory[j], spec, name, split, domain, "relax", 0.0) for j in picks)
        md = thermal_trajectory(relaxed_frame, temperature, settings.md_frames, settings.md_stride,
                                settings.md_equilibration, rng, settings.friction_per_fs)
        frames.extend(_tag(f, spec, name, split, domain, "md", temperature) for f in md)
    if kind == "is2rs":
        for frame in relaxed:
            frame.info["rejected_placements"] = sum(r["system"] == frame.info["system"] for r in rejected)
        return initial, relaxed
    return frames


def write_shift_dataset(directory: str | Path, settings: ShiftSettings | None = None, seed: int = 0,
                        progress: bool = False, workers: int = 1, reuse_files: bool = False) -> dict:
    """Generate every split and write ``<split>.extxyz`` (IS2RS: ``_initial`` / ``_relaxed``) and ``manifest.json``.

    The manifest has the layout of :func:`ltau_ase.datasets.catalysis.write_catalysis_dataset`, so
    :func:`ltau_ase.datasets.catalysis.read_split` reads the splits. Frame ids are unique over all
    splits, assigned in :func:`split_plan` order. ``reuse_files=True`` reads a split whose files are
    already in ``directory`` (from an interrupted run with the same settings and seed) instead of
    generating it again. Returns the manifest.
    """
    from ase.io import read
    from ase.io import write

    settings = settings or ShiftSettings()
    settings.validate()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"format": "ltau-ase shift dataset", "version": 1, "seed": int(seed),
                      "settings": asdict(settings), "reference": "ase.calculators.emt.EMT",
                      "units": {"energy": "eV", "forces": "eV/Å", "positions": "Å", "temperature": "K"},
                      "s2ef": {}, "is2rs": {}}
    plan = split_plan(settings)
    next_id = 0
    splits = plan.items()
    if progress:
        from tqdm.auto import tqdm

        splits = tqdm(list(splits), desc="shift data", unit="split")
    for split, (kind, domain, n) in splits:
        files = [directory / f"{split}.extxyz"] if kind != "is2rs" else [
            directory / f"{split}_{label}.extxyz" for label in ("initial", "relaxed")]
        data = None
        if reuse_files and all(f.is_file() for f in files):
            # every system has its own random stream, so the first n systems of a larger split are
            # exactly the split of n systems
            found = [read(f, index=":", format="extxyz") for f in files]
            if kind == "is2rs" and len(found[0]) >= n:
                data = tuple(frames[:n] for frames in found)
            elif kind != "is2rs":
                names = list(dict.fromkeys(f.info["system"] for f in found[0]))
                per_system = settings.md_frames + (settings.relax_frames if kind == "train" else 0)
                if len(names) >= n and all(sum(f.info["system"] == x for f in found[0]) >= per_system
                                           for x in names[:1]):
                    keep = set(names[:n])
                    data = [f for f in found[0] if f.info["system"] in keep]
        if data is None:
            data = generate_split(settings, split, seed=seed, progress=progress, workers=workers)
        groups = [data] if kind != "is2rs" else list(data)
        for frames in groups:
            for frame in frames:
                frame.info["frame_id"] = next_id
                next_id += 1
        if kind != "is2rs":
            path = directory / f"{split}.extxyz"
            write(path, data, format="extxyz")
            manifest["s2ef"][split] = {**_split_summary(data, path), "domain": domain}
        else:
            entry: dict = {"domain": domain}
            for label, frames in zip(("initial", "relaxed"), data):
                path = directory / f"{split}_{label}.extxyz"
                write(path, frames, format="extxyz")
                entry[label] = _split_summary(frames, path)
            entry["max_reference_fmax"] = max(float(f.info["relax_fmax"]) for f in data[1])
            entry["rejected_placements"] = int(sum(int(f.info["rejected_placements"]) for f in data[1]))
            manifest["is2rs"][split] = entry
    text = json.dumps(manifest, indent=2)
    (directory / "manifest.json").write_text(text)
    return json.loads(text)


def species_of(settings: ShiftSettings, domains: Sequence[str]) -> list[str]:
    """Chemical symbols of the given domains, sorted by atomic number."""
    from ase.data import atomic_numbers

    symbols: set[str] = set()
    for d in domains:
        metals, adsorbates, _, _ = settings.domain_spec(d)
        symbols |= set(metals)
        for a in adsorbates:
            symbols |= set(Atoms(ADSORBATES[a][0]).get_chemical_symbols())
    return sorted(symbols, key=lambda s: atomic_numbers[s])


__all__ = ["IS2RS_DOMAINS", "ShiftSettings", "domain_systems", "generate_split", "species_of", "split_plan",
           "thermal_trajectory", "write_shift_dataset"]
