"""OC20-like adsorbate + slab data with ASE's EMT calculator as the reference ("DFT").

Everything is deterministic from one integer seed: every system draws from its own
``numpy.random.default_rng([seed, split_index, system_index])``, so a split does not change when
another split grows.

Systems are fcc(111) / fcc(100) slabs of Cu, Ag, Au, Ni, Pd, Pt or Al with one adsorbate (H, O, N,
C, OH, CO, NO, CH, NH) placed with :func:`ase.build.add_adsorbate` on one of the facet's sites.
Tags follow OC20: 0 = fixed sub-surface ("bulk") atoms, 1 = free surface atoms, 2 = adsorbate;
exactly the tag-0 atoms are fixed with :class:`ase.constraints.FixAtoms`.

Two kinds of data are produced:

* **S2EF frames** (``train``, ``val``, ``calibration``, ``test_id``, ``test_ood``): structures
  sampled from EMT relaxation trajectories, rattled relaxed structures and short Langevin MD,
  each with the EMT energy (eV) and the *unconstrained* EMT forces (eV/Å, also on fixed atoms) in
  a :class:`~ase.calculators.singlepoint.SinglePointCalculator`, which is what nequip's
  ``ASEDataModule`` reads.
* **IS2RS pairs** (``is2rs_id``, ``is2rs_ood``): initial structures and their EMT-relaxed
  references (LBFGS to ``relax_fmax`` over the free atoms, bulk fixed). A relaxation that does not
  converge raises :class:`RuntimeError`; nothing is dropped.

Every frame carries ``atoms.info``: ``frame_id`` (int, unique across all frames of all splits),
``system``, ``metal``, ``adsorbate``, ``adsorbate_family``, ``facet``, ``site``, ``config_type``
(``relax`` | ``rattle`` | ``md`` | ``is2rs_initial`` | ``is2rs_relaxed``), ``split`` and ``domain``
(``in_domain`` | ``out_of_domain``).

Out-of-domain systems use a held-out metal (default Au, Al) or a held-out adsorbate (default NO);
they never occur in ``train``, ``val``, ``calibration``, ``test_id`` or ``is2rs_id``.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.optimize import LBFGS

from ltau_ase.core.checks import check_int
from ltau_ase.core.fileformat import sha256_file
from ltau_ase.core.trainingset import assign_frame_ids
from ltau_ase.simulate.md import thermalized_langevin

EMT_METALS = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
FACET_SITES = {"111": ("ontop", "bridge", "fcc", "hcp"), "100": ("ontop", "bridge", "hollow")}
# Adsorbate geometry: (symbols, bond length in Å of the second atom above the binding atom).
ADSORBATES = {
    "H": ("H", None),
    "O": ("O", None),
    "N": ("N", None),
    "C": ("C", None),
    "OH": ("OH", 0.97),
    "CO": ("CO", 1.15),
    "NO": ("NO", 1.15),
    "CH": ("CH", 1.09),
    "NH": ("NH", 1.03),
}
ADSORBATE_FAMILY = {"H": "H", "O": "O", "OH": "O", "C": "C", "CO": "C", "CH": "C", "N": "N", "NH": "N", "NO": "N"}
S2EF_SPLITS = ("train", "val", "calibration", "test_id", "test_ood")
IS2RS_SPLITS = ("is2rs_id", "is2rs_ood")
_SPLIT_INDEX = {name: i for i, name in enumerate(S2EF_SPLITS + IS2RS_SPLITS)}


@dataclass(frozen=True)
class DatasetSize:
    """Number of systems per split and S2EF frames per system.

    ``relax_frames``, ``rattle_frames`` and ``md_frames`` are taken from every S2EF system, so a
    split of ``n`` systems holds ``n * (relax_frames + rattle_frames + md_frames)`` frames.
    """

    train: int
    val: int
    calibration: int
    test_id: int
    test_ood: int
    is2rs_id: int
    is2rs_ood: int
    relax_frames: int = 4
    rattle_frames: int = 2
    md_frames: int = 2

    def n_systems(self, split: str) -> int:
        return int(getattr(self, split))


SIZES = {
    "quick": DatasetSize(train=12, val=3, calibration=5, test_id=5, test_ood=6, is2rs_id=4, is2rs_ood=4),
    "full": DatasetSize(train=80, val=8, calibration=20, test_id=20, test_ood=24, is2rs_id=30, is2rs_ood=30),
}


def check_composition(metals: Sequence[str], adsorbates: Sequence[str]) -> None:
    """Raise ValueError for a metal EMT cannot model (fcc: EMT_METALS) or an adsorbate not in ADSORBATES."""
    for metal in metals:
        if metal not in EMT_METALS:
            raise ValueError(f"metal {metal!r} is not an fcc metal EMT supports; expected one of {EMT_METALS}")
    for ads in adsorbates:
        if ads not in ADSORBATES:
            raise ValueError(f"adsorbate {ads!r} is unknown; expected one of {tuple(ADSORBATES)}")


@dataclass(frozen=True)
class CatalysisSettings:
    """Composition and simulation settings (distances Å, temperatures K, forces eV/Å)."""

    metals_in_domain: tuple[str, ...] = ("Cu", "Ag", "Ni", "Pd", "Pt")
    metals_out_of_domain: tuple[str, ...] = ("Au", "Al")
    adsorbates_in_domain: tuple[str, ...] = ("H", "O", "N", "C", "OH", "CO", "CH", "NH")
    adsorbates_out_of_domain: tuple[str, ...] = ("NO",)
    facets: tuple[str, ...] = ("111", "100")
    # (nx, ny, layers); the top two layers are free, the rest fixed (tag 0).
    slab_sizes: tuple[tuple[int, int, int], ...] = ((2, 2, 3), (2, 2, 4), (3, 3, 3))
    free_layers: int = 2
    vacuum: float = 6.0
    height_range: tuple[float, float] = (1.3, 2.3)
    lateral_offset: float = 0.4
    max_tilt_deg: float = 25.0
    initial_rattle: float = 0.04
    trajectory_fmax: float = 0.05
    trajectory_steps: int = 80
    rattle_range: tuple[float, float] = (0.03, 0.12)
    md_temperature_range: tuple[float, float] = (300.0, 900.0)
    md_stride: int = 5
    md_timestep_fs: float = 1.0
    relax_fmax: float = 0.01
    relax_steps: int = 1000
    relax_attempts: int = 3

    def validate(self) -> None:
        check_composition(self.metals_in_domain + self.metals_out_of_domain,
                          self.adsorbates_in_domain + self.adsorbates_out_of_domain)
        if set(self.metals_in_domain) & set(self.metals_out_of_domain):
            raise ValueError("a metal cannot be both in-domain and out-of-domain")
        if set(self.adsorbates_in_domain) & set(self.adsorbates_out_of_domain):
            raise ValueError("an adsorbate cannot be both in-domain and out-of-domain")
        if self.relax_attempts < 1:
            raise ValueError(f"relax_attempts must be at least 1, got {self.relax_attempts}")
        if not self.metals_in_domain or not self.adsorbates_in_domain:
            raise ValueError("at least one in-domain metal and one in-domain adsorbate are required")
        if not (self.metals_out_of_domain or self.adsorbates_out_of_domain):
            raise ValueError("an out-of-domain split needs a held-out metal or a held-out adsorbate")
        for facet in self.facets:
            if facet not in FACET_SITES:
                raise ValueError(f"facet {facet!r} is unknown; expected one of {tuple(FACET_SITES)}")
        for nx, ny, layers in self.slab_sizes:
            if layers <= self.free_layers or min(nx, ny) < 1:
                raise ValueError(
                    f"slab size {(nx, ny, layers)} needs more than free_layers={self.free_layers} layers"
                )
        if self.relax_fmax <= 0:
            raise ValueError(f"relax_fmax must be > 0 eV/Å, got {self.relax_fmax}")


@dataclass(frozen=True)
class SystemSpec:
    """One adsorbate/slab system before its random geometry is drawn."""

    metal: str
    facet: str
    adsorbate: str
    site: str
    size: tuple[int, int, int]
    domain: str

    def name(self, split: str, index: int) -> str:
        nx, ny, nl = self.size
        return f"{split}-{index:03d}-{self.metal}{self.facet}-{nx}x{ny}x{nl}-{self.adsorbate}-{self.site}"


@dataclass
class CatalysisDataset:
    """Generated data: S2EF frames per split and IS2RS (initial, relaxed) pairs per split."""

    seed: int
    size: DatasetSize
    settings: CatalysisSettings
    s2ef: dict[str, list[Atoms]] = field(default_factory=dict)
    is2rs: dict[str, tuple[list[Atoms], list[Atoms]]] = field(default_factory=dict)
    #: IS2RS placements redrawn because their EMT reference did not converge (system, attempt, fmax, reason)
    rejected: list[dict] = field(default_factory=list)

    def all_frames(self) -> Iterator[Atoms]:
        for frames in self.s2ef.values():
            yield from frames
        for initial, relaxed in self.is2rs.values():
            yield from initial
            yield from relaxed


def slab_with_adsorbate(spec: SystemSpec, rng: np.random.Generator, settings: CatalysisSettings) -> Atoms:
    """Build a randomly perturbed slab + adsorbate with OC20 tags and FixAtoms on tag 0.

    The adsorbate sits at a random height in ``settings.height_range`` above the site, shifted
    laterally by up to ``lateral_offset`` Å and tilted by up to ``max_tilt_deg``; free slab atoms
    are rattled by ``initial_rattle`` Å (normal std).
    """
    nx, ny, layers = spec.size
    build = fcc111 if spec.facet == "111" else fcc100
    slab = build(spec.metal, size=(nx, ny, layers), vacuum=settings.vacuum)
    # ase.build numbers layers 1 (top) .. layers (bottom).
    layer = slab.get_tags()
    tags = np.where(layer <= settings.free_layers, 1, 0)
    symbols, bond = ADSORBATES[spec.adsorbate]
    positions = [[0.0, 0.0, 0.0]]
    if bond is not None:
        tilt = np.deg2rad(rng.uniform(0.0, settings.max_tilt_deg))
        azimuth = rng.uniform(0.0, 2 * np.pi)
        positions.append(bond * np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt)]))
    molecule = Atoms(symbols, positions=positions)
    radius = settings.lateral_offset * np.sqrt(rng.uniform())
    angle = rng.uniform(0.0, 2 * np.pi)
    add_adsorbate(
        slab,
        molecule,
        height=rng.uniform(*settings.height_range),
        position=spec.site,
        offset=None,
        mol_index=0,
    )
    del slab.info["adsorbate_info"]  # a dict extxyz cannot store
    n_slab = len(tags)
    slab.positions[n_slab:, :2] += radius * np.array([np.cos(angle), np.sin(angle)])
    slab.set_tags(np.concatenate([tags, np.full(len(slab) - n_slab, 2)]))
    free = slab.get_tags() > 0
    slab.positions[free] += rng.normal(0.0, settings.initial_rattle, size=(int(free.sum()), 3))
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 0))
    return slab


def label_with_emt(atoms: Atoms) -> Atoms:
    """Copy of ``atoms`` with EMT energy (eV) and unconstrained forces (eV/Å) in a SinglePointCalculator."""
    frame = atoms.copy()
    frame.calc = EMT()
    energy = float(frame.get_potential_energy())
    forces = frame.get_forces(apply_constraint=False).copy()
    frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces)
    return frame


def free_fmax(atoms: Atoms) -> float:
    """Largest force norm (eV/Å) over atoms not fixed by FixAtoms, from ``atoms.calc``."""
    forces = atoms.get_forces(apply_constraint=True)
    return float(np.linalg.norm(forces, axis=1).max())


def relax_with_emt(atoms: Atoms, fmax: float, steps: int) -> tuple[Atoms, list[Atoms], bool]:
    """LBFGS-relax a copy of ``atoms`` with EMT (fixed atoms stay fixed).

    Returns:
        (relaxed frame labelled with EMT, labelled frames of every optimizer step including the
        initial one, converged flag: fmax over free atoms ≤ ``fmax``).
    """
    work = atoms.copy()
    work.calc = EMT()
    trajectory: list[Atoms] = []
    optimizer = LBFGS(work, logfile=None)
    converged = False
    for converged in optimizer.irun(fmax=fmax, steps=steps):
        # irun yields after evaluating the current positions, so the EMT results are fresh here.
        frame = work.copy()
        frame.calc = SinglePointCalculator(
            frame,
            energy=float(work.get_potential_energy()),
            forces=work.get_forces(apply_constraint=False).copy(),
        )
        trajectory.append(frame)
    relaxed = trajectory[-1]
    return relaxed, trajectory, bool(converged) and free_fmax(relaxed) <= fmax


def _md_frames(atoms: Atoms, n_frames: int, rng: np.random.Generator, settings: CatalysisSettings) -> list[Atoms]:
    work = atoms.copy()
    work.calc = EMT()
    temperature = rng.uniform(*settings.md_temperature_range)
    # fixcm=False: the bottom layers are fixed, so the centre of mass cannot drift anyway.
    dyn = thermalized_langevin(work, temperature, rng, timestep_fs=settings.md_timestep_fs)
    frames = []
    for _ in range(n_frames):
        dyn.run(settings.md_stride)
        frames.append(label_with_emt(work))
    return frames


def _system_specs(split: str, n: int, seed: int, settings: CatalysisSettings) -> list[SystemSpec]:
    """Systems of a split: (metal, adsorbate) combinations cycled in a seeded shuffle for balance."""
    if split.endswith("ood"):
        combos = [(m, a) for m in settings.metals_out_of_domain
                  for a in settings.adsorbates_in_domain + settings.adsorbates_out_of_domain]
        combos += [(m, a) for m in settings.metals_in_domain for a in settings.adsorbates_out_of_domain]
        domain = "out_of_domain"
    else:
        combos = list(itertools.product(settings.metals_in_domain, settings.adsorbates_in_domain))
        domain = "in_domain"
    rng = np.random.default_rng([seed, _SPLIT_INDEX[split], 10**6])
    order = rng.permutation(len(combos))
    specs = []
    for i in range(n):
        metal, adsorbate = combos[order[i % len(combos)]]
        facet = settings.facets[int(rng.integers(len(settings.facets)))]
        sites = FACET_SITES[facet]
        site = sites[int(rng.integers(len(sites)))]
        size = settings.slab_sizes[int(rng.integers(len(settings.slab_sizes)))]
        specs.append(SystemSpec(metal, facet, adsorbate, site, tuple(size), domain))
    return specs


def _info(frame: Atoms, spec: SystemSpec, name: str, split: str, config_type: str) -> Atoms:
    frame.info.update(
        system=name,
        metal=spec.metal,
        adsorbate=spec.adsorbate,
        adsorbate_family=ADSORBATE_FAMILY[spec.adsorbate],
        facet=spec.facet,
        site=spec.site,
        config_type=config_type,
        split=split,
        domain=spec.domain,
    )
    return frame


def _s2ef_system(spec: SystemSpec, name: str, split: str, rng: np.random.Generator,
                 size: DatasetSize, settings: CatalysisSettings) -> list[Atoms]:
    initial = slab_with_adsorbate(spec, rng, settings)
    relaxed, trajectory, _ = relax_with_emt(initial, settings.trajectory_fmax, settings.trajectory_steps)
    picks = np.unique(np.linspace(0, len(trajectory) - 1, size.relax_frames).round().astype(int))
    frames = [_info(trajectory[i], spec, name, split, "relax") for i in picks]
    free = relaxed.get_tags() > 0
    for _ in range(size.rattle_frames):
        rattled = relaxed.copy()
        sigma = rng.uniform(*settings.rattle_range)
        rattled.positions[free] += rng.normal(0.0, sigma, size=(int(free.sum()), 3))
        frames.append(_info(label_with_emt(rattled), spec, name, split, "rattle"))
    if size.md_frames:
        for frame in _md_frames(relaxed, size.md_frames, rng, settings):
            frames.append(_info(frame, spec, name, split, "md"))
    return frames


def _is2rs_system(spec: SystemSpec, name: str, split: str, rng: np.random.Generator,
                  settings: CatalysisSettings, rejected: list[dict]) -> tuple[Atoms, Atoms]:
    """An (initial, EMT-relaxed) pair. A placement whose reference relaxation does not converge
    (e.g. an adsorbate sliding on a flat EMT surface) is redrawn, up to ``settings.relax_attempts``
    times; every rejected attempt is appended to ``rejected`` (and ends up in the manifest)."""
    for attempt in range(settings.relax_attempts):
        initial = label_with_emt(slab_with_adsorbate(spec, rng, settings))
        relaxed, trajectory, converged = relax_with_emt(initial, settings.relax_fmax, settings.relax_steps)
        if converged:
            break
        rejected.append({"system": name, "attempt": attempt, "fmax": round(free_fmax(relaxed), 4),
                         "reason": f"EMT reference not below fmax {settings.relax_fmax} eV/Å in "
                                   f"{settings.relax_steps} steps"})
    else:
        raise RuntimeError(
            f"EMT reference relaxation of {name} did not reach fmax {settings.relax_fmax} eV/Å within "
            f"{settings.relax_steps} steps in {settings.relax_attempts} placements (last fmax "
            f"{free_fmax(relaxed):.4f}); raise relax_steps or relax_attempts"
        )
    _info(initial, spec, name, split, "is2rs_initial")
    _info(relaxed, spec, name, split, "is2rs_relaxed")
    relaxed.info["relax_steps"] = len(trajectory) - 1
    relaxed.info["relax_fmax"] = free_fmax(relaxed)
    return initial, relaxed


def generate_catalysis_dataset(
    seed: int = 0,
    size: str | DatasetSize = "quick",
    settings: CatalysisSettings | None = None,
    progress: bool = False,
) -> CatalysisDataset:
    """Generate all S2EF splits and IS2RS pairs, deterministically from ``seed``.

    Args:
        seed: non-negative integer seed.
        size: ``"quick"``, ``"full"`` or a :class:`DatasetSize`.
        settings: composition/simulation settings (default :class:`CatalysisSettings`).
        progress: show a tqdm bar over systems.
    Returns:
        :class:`CatalysisDataset`; frame ids are assigned in the order ``S2EF_SPLITS`` then, per
        IS2RS split, initial then relaxed structures, starting at 0.
    """
    check_int(seed, "seed", minimum=0)
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"size {size!r} is unknown; expected one of {tuple(SIZES)} or a DatasetSize")
        size = SIZES[size]
    elif not isinstance(size, DatasetSize):
        raise TypeError(f"size must be a str or DatasetSize, got {type(size).__name__}")
    settings = settings or CatalysisSettings()
    settings.validate()
    seed = int(seed)
    data = CatalysisDataset(seed=seed, size=size, settings=settings)
    total = sum(size.n_systems(s) for s in S2EF_SPLITS + IS2RS_SPLITS)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="EMT data", unit="system")
    try:
        for split in S2EF_SPLITS + IS2RS_SPLITS:
            specs = _system_specs(split, size.n_systems(split), seed, settings)
            frames: list[Atoms] = []
            initial: list[Atoms] = []
            relaxed: list[Atoms] = []
            for i, spec in enumerate(specs):
                rng = np.random.default_rng([seed, _SPLIT_INDEX[split], i])
                name = spec.name(split, i)
                if split in S2EF_SPLITS:
                    frames.extend(_s2ef_system(spec, name, split, rng, size, settings))
                else:
                    pair = _is2rs_system(spec, name, split, rng, settings, data.rejected)
                    initial.append(pair[0])
                    relaxed.append(pair[1])
                if bar is not None:
                    bar.update(1)
            if split in S2EF_SPLITS:
                data.s2ef[split] = frames
            else:
                data.is2rs[split] = (initial, relaxed)
    finally:
        if bar is not None:
            bar.close()
    assign_frame_ids(list(data.all_frames()), 0)
    return data


def _split_summary(frames: Sequence[Atoms], path: Path) -> dict:
    ids = [int(f.info["frame_id"]) for f in frames]
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "n_frames": len(frames),
        "n_atoms": int(sum(len(f) for f in frames)),
        "frame_id_range": [min(ids), max(ids)] if ids else None,
        "metals": sorted({f.info["metal"] for f in frames}),
        "adsorbates": sorted({f.info["adsorbate"] for f in frames}),
        "config_types": sorted({f.info["config_type"] for f in frames}),
    }


def write_catalysis_dataset(
    directory: str | Path,
    seed: int = 0,
    size: str | DatasetSize = "quick",
    settings: CatalysisSettings | None = None,
    progress: bool = False,
) -> dict:
    """Generate the dataset and write it as extxyz files plus ``manifest.json`` in ``directory``.

    Files: ``<split>.extxyz`` for every S2EF split, ``<split>_initial.extxyz`` and
    ``<split>_relaxed.extxyz`` (same order) for every IS2RS split. Returns the manifest dict (paths
    in it are relative to ``directory``).
    """
    from ase.io import write

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = generate_catalysis_dataset(seed=seed, size=size, settings=settings, progress=progress)
    manifest: dict = {
        "format": "ltau-ase catalysis dataset",
        "version": 1,
        "seed": data.seed,
        "size": asdict(data.size),
        "settings": asdict(data.settings),
        "reference": "ase.calculators.emt.EMT",
        "units": {"energy": "eV", "forces": "eV/Å", "positions": "Å"},
        "s2ef": {},
        "is2rs": {},
        "rejected_is2rs_placements": data.rejected,
    }
    for split, frames in data.s2ef.items():
        path = directory / f"{split}.extxyz"
        write(path, frames, format="extxyz")
        manifest["s2ef"][split] = _split_summary(frames, path)
    for split, (initial, relaxed) in data.is2rs.items():
        entry = {}
        for kind, frames in (("initial", initial), ("relaxed", relaxed)):
            path = directory / f"{split}_{kind}.extxyz"
            write(path, frames, format="extxyz")
            entry[kind] = _split_summary(frames, path)
        entry["max_reference_fmax"] = max((float(f.info["relax_fmax"]) for f in relaxed), default=None)
        manifest["is2rs"][split] = entry
    text = json.dumps(manifest, indent=2)
    (directory / "manifest.json").write_text(text)
    return json.loads(text)


def read_split(directory: str | Path, split: str) -> list[Atoms] | tuple[list[Atoms], list[Atoms]]:
    """Read one split written by :func:`write_catalysis_dataset`.

    Returns a list of frames for an S2EF split, or ``(initial, relaxed)`` lists for an IS2RS split.
    """
    from ase.io import read

    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found; write the dataset with write_catalysis_dataset first")
    manifest = json.loads(manifest_path.read_text())
    if split in manifest["s2ef"]:
        return read(directory / manifest["s2ef"][split]["file"], index=":", format="extxyz")
    if split in manifest["is2rs"]:
        entry = manifest["is2rs"][split]
        return (
            read(directory / entry["initial"]["file"], index=":", format="extxyz"),
            read(directory / entry["relaxed"]["file"], index=":", format="extxyz"),
        )
    raise ValueError(
        f"split {split!r} not in {manifest_path}; expected one of {sorted(manifest['s2ef']) + sorted(manifest['is2rs'])}"
    )


__all__ = [
    "ADSORBATES",
    "ADSORBATE_FAMILY",
    "CatalysisDataset",
    "CatalysisSettings",
    "DatasetSize",
    "EMT_METALS",
    "FACET_SITES",
    "IS2RS_SPLITS",
    "S2EF_SPLITS",
    "SIZES",
    "SystemSpec",
    "free_fmax",
    "generate_catalysis_dataset",
    "label_with_emt",
    "read_split",
    "relax_with_emt",
    "slab_with_adsorbate",
    "write_catalysis_dataset",
]
