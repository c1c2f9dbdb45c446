"""Compiled nequip models (``nequip-compile`` conventions) that keep LTAU's latent features.

Writing (:func:`compile_model`, the ``ltau compile`` command): an eager checkpoint, optionally with a
fitted estimator appended as an :class:`~ltau_ase.nequip.inmodel.LTAUReadout`, becomes one compiled
file whose outputs are::

    atomic_energy total_energy forces stress virial node_features [ltau_uncertainty ltau_confidence
    ltau_expected_force_error ltau_latent_distance]

from the inputs ``pos edge_index atom_types cell edge_cell_shift`` (the single-frame inputs of
nequip's ``ase`` and ``pair_nequip`` targets), so one file serves ASE (energy, stress) and LAMMPS
(per-atom energy, virial). The metadata holds nequip's usual keys plus ``ltau_source`` (JSON: the
source checkpoint's sha256, a sha256 fingerprint of its weights, the descriptor dimension) and, with
an estimator, ``ltau_readout`` (mode, k, threshold, scale, species, the estimator's sha256).

Modes: ``aotinductor`` (``.nequip.pt2``) works with torch >= 2.6. ``torchscript`` (``.nequip.pth``)
is refused by nequip 0.19.1 on torch >= 2.10 (TorchScript is deprecated there); this module refuses
it likewise, with the same reason, and loads existing ``.nequip.pth`` files through nequip's loader.

Reading (:func:`load_compiled_calculator`, used by ``LatentNequIPCalculator.from_model_file``):
a compiled file must list ``node_features`` among its outputs; otherwise a ``ValueError`` gives the
``nequip-compile`` flags that add it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from nequip.data import AtomicDataDict

from ltau_ase.nequip.calculator import DESCRIPTORS_KEY, LATENT_FIELD, LatentNequIPCalculator
from ltau_ase.nequip.inmodel import (BOUNDED_FIELDS, DISTANCE_AWARE_FIELDS, ERROR_BOUND_FIELD, LTAU_FIELDS,
                                     LTAU_METADATA_KEY, ltau_fields_to_results)

COMPILE_MODES = ("aotinductor", "torchscript")
SUFFIX = {"aotinductor": ".nequip.pt2", "torchscript": ".nequip.pth"}
#: metadata key with the JSON provenance of the source checkpoint
SOURCE_METADATA_KEY = "ltau_source"
INPUT_FIELDS = [
    AtomicDataDict.POSITIONS_KEY,
    AtomicDataDict.EDGE_INDEX_KEY,
    AtomicDataDict.ATOM_TYPE_KEY,
    AtomicDataDict.CELL_KEY,
    AtomicDataDict.EDGE_CELL_SHIFT_KEY,
]
BASE_OUTPUT_FIELDS = [
    AtomicDataDict.PER_ATOM_ENERGY_KEY,
    AtomicDataDict.TOTAL_ENERGY_KEY,
    AtomicDataDict.FORCE_KEY,
    AtomicDataDict.STRESS_KEY,
    AtomicDataDict.VIRIAL_KEY,
]
#: nequip-compile arguments that produce a compiled file with the latent features
NEQUIP_COMPILE_LATENT_FLAGS = (
    "--mode aotinductor --input-fields " + " ".join(INPUT_FIELDS)
    + " --output-fields " + " ".join(BASE_OUTPUT_FIELDS + [LATENT_FIELD])
)

PathLike = Union[str, os.PathLike]


def torchscript_supported() -> bool:
    """False on torch >= 2.10, where nequip 0.19.1 refuses TorchScript compilation."""
    from nequip.utils.versions import _TORCH_GE_2_10

    return not _TORCH_GE_2_10


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the eager model's parameters and buffers (names, dtypes, shapes, values; sorted by name)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda'; got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' requested but torch sees no CUDA GPU here "
            f"(torch {torch.__version__}, cuda build: {torch.version.cuda}); compile with --device cpu, or on a GPU machine"
        )
    return dev


def _check_output(output_path: PathLike, mode: str, overwrite: bool) -> Path:
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {COMPILE_MODES}; got {mode!r}")
    out = Path(output_path)
    if not out.name.endswith(SUFFIX[mode]):
        raise ValueError(f"output {out} must end with {SUFFIX[mode]} for mode {mode!r} (nequip-compile's convention)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output directory {out.parent} does not exist")
    if mode == "torchscript" and not torchscript_supported():
        raise ValueError(
            f"TorchScript compilation is not supported with torch {torch.__version__} (nequip "
            "refuses it on torch >= 2.10, where TorchScript is deprecated); use mode 'aotinductor' (.nequip.pt2)"
        )
    return out


def default_example(type_names: list[str], r_max: float, seed: int = 0):
    """A periodic 3×3×3 simple-cubic structure (spacing 0.45·r_max, rattled) cycling through the type names.

    Only used to trace shapes for compilation (sizes are dynamic afterwards); type names must be
    chemical symbols, otherwise pass your own ``example``.
    """
    from ase import Atoms

    a = 0.45 * float(r_max)
    grid = np.stack(np.meshgrid(*(np.arange(3),) * 3, indexing="ij"), -1).reshape(-1, 3) * a
    rng = np.random.default_rng(seed)
    symbols = [type_names[i % len(type_names)] for i in range(len(grid))]
    return Atoms(symbols, positions=grid + rng.normal(0, 0.05 * a, grid.shape), cell=np.eye(3) * 3 * a, pbc=True)


def compile_model(
    model_path: PathLike,
    output_path: PathLike,
    estimator: Any = None,
    mode: str = "aotinductor",
    device: str = "cpu",
    reference: str = "exact",
    n_centroids: Optional[int] = None,
    overwrite: bool = False,
    allow_model_mismatch: bool = False,
    example: Any = None,
    trusted: bool = False,
    paper_form: bool = False,
    coverage: Optional[float] = None,
    **load_kwargs: Any,
) -> Path:
    """Compile an eager nequip checkpoint (with LTAU appended when ``estimator`` is given).

    Args:
        model_path: ``.ckpt`` checkpoint (verified by ``safe_load`` unless ``trusted``) or, with
            ``trusted=True``, a ``.nequip.zip`` package.
        output_path: ``*.nequip.pt2`` (aotinductor) or ``*.nequip.pth`` (torchscript). Written to a
            temporary file beside it and renamed only when complete: a failure leaves nothing there.
        estimator: None (latent features only), an ``LTAUEstimator`` or the path of a ``.ltau`` file.
            Its ``metadata["model_sha256"]`` must equal ``model_path``'s sha256 unless
            ``allow_model_mismatch``; its descriptor dimension must equal the model's.
        mode, device: as nequip-compile's ``--mode`` / ``--device`` (the file runs on that device only).
        reference: ``"exact"`` (all training latents) or ``"compressed"`` (k-means centroids).
        n_centroids: centroids of the compressed reference (default N / 8, at most 4096).
        overwrite: replace an existing ``output_path``.
        paper_form: compile a calibrated estimator in the paper's form instead of its distance-aware
            form (see :func:`ltau_ase.nequip.inmodel.readout_from_estimator`).
        coverage: q in (0, 1): also compile the conformal per-atom error bounds at coverage q (field
            ``ltau_force_error_bound``, eV/Å; needs a calibrated estimator in its distance-aware form).
        example: an ``ase.Atoms`` used to trace shapes (default :func:`default_example`).
        load_kwargs: for ``LatentNequIPCalculator.from_model_file`` (e.g.
            ``chemical_species_to_atom_type_map``, default identity).
    Returns:
        the output path.
    Raises:
        ValueError / FileExistsError / FileNotFoundError: bad input, named in the message.
    """
    from ltau_ase.core.fileformat import sha256_file

    out = _check_output(output_path, mode, overwrite)
    dev = _check_device(device)
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"model file {model_path} does not exist")
    if model_path.name.endswith((".nequip.pt2", ".nequip.pth")):
        raise ValueError(f"{model_path} is already compiled; compile from the eager checkpoint (.ckpt) instead")
    est, est_sha = None, None
    if estimator is not None:
        from ltau_ase.core.estimator import LTAUEstimator

        if isinstance(estimator, (str, os.PathLike)):
            est_sha = sha256_file(estimator)
            est = LTAUEstimator.load(str(estimator))
        else:
            est = estimator
        from ltau_ase.nequip.inmodel import check_readout_form

        check_readout_form(est, paper_form, reference, coverage)
    load_kwargs.setdefault("chemical_species_to_atom_type_map", True)
    eager = LatentNequIPCalculator.from_model_file(model_path, device="cpu", trusted=trusted, **load_kwargs)
    graph_model = eager.model
    # the hash of the bytes the model was built from (a checkpoint is read once), else of the file
    model_sha = getattr(eager, "model_sha256", None) or sha256_file(model_path)
    if est is not None:
        recorded = (est.metadata or {}).get("model_sha256")
        if recorded != model_sha and not allow_model_mismatch:
            raise ValueError(
                f"the estimator was fitted for a model with sha256 {recorded} but {model_path} has sha256 "
                f"{model_sha}: it belongs to another model (pass allow_model_mismatch=True to compile anyway)"
            )
    if est is not None and int(est.n_features_in_) != eager.descriptor_dim:
        raise ValueError(
            f"the estimator was fitted on {est.n_features_in_}-dimensional descriptors but {model_path}'s "
            f"'{LATENT_FIELD}' have {eager.descriptor_dim} features (D mismatch): it belongs to another model"
        )
    source = {"model_sha256": model_sha, "weights_sha256": weights_fingerprint(graph_model),
              "descriptor_dim": int(eager.descriptor_dim), "model_file": model_path.name}
    outputs = BASE_OUTPUT_FIELDS + [LATENT_FIELD]
    if est is not None:
        from ltau_ase.nequip.inmodel import append_ltau, readout_from_estimator

        readout = readout_from_estimator(
            graph_model, est, mode=reference, n_centroids=n_centroids,
            provenance={"estimator_sha256": est_sha, "model_sha256": model_sha}, paper_form=paper_form,
            coverage=coverage,
        )
        append_ltau(graph_model, readout)
        outputs = outputs + list(readout.fields)
    if example is None:
        example = default_example(graph_model.type_names, float(graph_model.metadata["r_max"]))
    data = eager.atoms_to_data(example)

    from nequip.utils.global_state import get_latest_global_state

    metadata = dict(graph_model.metadata)
    metadata.update(get_latest_global_state(only_metadata_related=True))
    metadata = {k: str(int(v)) if isinstance(v, bool) else str(v) for k, v in metadata.items()}
    metadata[SOURCE_METADATA_KEY] = json.dumps(source, sort_keys=True, separators=(",", ":"))

    # compile into a private directory beside the output (same file system), under the final name
    # (AOTI names the archive's root folder after it), then rename: a failure leaves nothing at ``out``
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp = tmp_dir / out.name
    try:
        if mode == "torchscript":
            from nequip.model.inference_models.torchscript import save_torchscript_model

            save_torchscript_model(graph_model, metadata, str(tmp), dev)
        else:
            _export_aoti(graph_model, data, outputs, metadata, str(tmp), dev)
        if overwrite:
            os.replace(tmp, out)
        else:
            os.link(tmp, out)  # fails if OUTPUT appeared meanwhile: never replace a file not meant to be
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out


def _export_aoti(model, data, outputs, metadata, path: str, device: torch.device) -> None:
    """nequip-compile's AOTI branch for the single-frame (ase / pair_nequip) inputs."""
    from nequip.scripts._compile_utils import single_frame_batch_map_settings, single_frame_data_settings
    from nequip.utils.aoti_metadata import NEQUIP_AOTI_INPUTS_KEY, NEQUIP_AOTI_OUTPUTS_KEY, serialize_aoti_keys
    from nequip.utils.aot import aot_export_model
    from nequip.utils.versions import check_pt2_compile_compatibility

    check_pt2_compile_compatibility()
    dim = torch.export.dynamic_shapes.Dim
    batch_map = single_frame_batch_map_settings({
        "graph": dim("num_frames", min=2, max=torch.inf),
        "node": dim("num_nodes", min=2, max=torch.inf),
        "edge": dim("num_edges", min=2, max=torch.inf),
    })
    data = single_frame_data_settings(AtomicDataDict.to_(dict(data), device))
    metadata = dict(metadata)
    metadata[NEQUIP_AOTI_INPUTS_KEY] = serialize_aoti_keys(INPUT_FIELDS)
    metadata[NEQUIP_AOTI_OUTPUTS_KEY] = serialize_aoti_keys(outputs)
    aot_export_model(
        model=model, device=device, input_fields=INPUT_FIELDS, output_fields=outputs, data=data,
        batch_map=batch_map, output_path=path, inductor_configs={"aot_inductor.metadata": metadata}, seed=1,
    )


# ---------------------------------------------------------------------------- reading
class CompiledLatentNequIPCalculator(LatentNequIPCalculator):
    """``LatentNequIPCalculator`` over a compiled file; also returns the in-model LTAU fields if present.

    Extra attributes: ``metadata`` (the compiled file's metadata, strings), ``source`` (dict from
    ``ltau_source`` or None), ``ltau_readout`` (dict from ``ltau_readout`` or None: the file computes
    LTAU itself). Results gain ``ltau_uncertainty``, ``ltau_confidence``,
    ``ltau_expected_force_error``, ``ltau_latent_distance`` ((N,) float64) when the file has them.
    """

    def __init__(self, model: torch.nn.Module, device: Any, metadata: dict, output_keys: Optional[list],
                 **kwargs: Any) -> None:
        self.metadata = metadata
        self.source = _json_or_none(metadata.get(SOURCE_METADATA_KEY))
        self.ltau_readout = _json_or_none(metadata.get(LTAU_METADATA_KEY))
        self.output_keys = output_keys
        super().__init__(model, device, **kwargs)
        if self.ltau_readout is not None:
            fields = self.ltau_readout.get("fields", list(LTAU_FIELDS))
            known = [list(LTAU_FIELDS), list(DISTANCE_AWARE_FIELDS), list(BOUNDED_FIELDS)]
            if fields not in known:
                raise ValueError(f"compiled model metadata lists LTAU fields {fields!r}; expected one of {known}")
            if ERROR_BOUND_FIELD in fields:
                from ltau_ase.core.conformal import check_coverage

                check_coverage(self.ltau_readout.get("coverage"))  # the bounds' coverage, a float in (0, 1)
            self.implemented_properties = [*self.implemented_properties, *fields]

    def _descriptor_dim(self) -> Optional[int]:
        # compiled modules do not declare irreps: D comes from the metadata (None: learnt at the first call)
        return None if self.source is None else int(self.source["descriptor_dim"])

    @property
    def source_model_sha256(self) -> Optional[str]:
        """sha256 of the checkpoint this file was compiled from (None if the file does not record it)."""
        return None if self.source is None else self.source.get("model_sha256")

    def save_extra_outputs(self, out: AtomicDataDict.Type) -> None:
        features = out.get(LATENT_FIELD)
        if features is None:
            raise ValueError(
                f"the compiled model returned no '{LATENT_FIELD}'; recompile it with nequip-compile "
                f"{NEQUIP_COMPILE_LATENT_FLAGS} (or `ltau compile`)"
            )
        if self.descriptor_dim is None:  # TorchScript files do not declare their fields: learn D once
            self.descriptor_dim = int(features.shape[-1])
        super().save_extra_outputs(out)
        self.results.update(ltau_fields_to_results(out, len(self.atoms)))


def _json_or_none(text: Optional[str]) -> Optional[dict]:
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"compiled model metadata holds malformed JSON: {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"compiled model metadata holds {type(value).__name__}, expected a JSON object")
    return value


def load_compiled_calculator(
    path: PathLike,
    device: str = "cpu",
    chemical_species_to_atom_type_map: Any = None,
    neighborlist_backend: Optional[str] = None,
    **kwargs: Any,
) -> CompiledLatentNequIPCalculator:
    """A calculator over a ``.nequip.pt2`` / ``.nequip.pth`` file that outputs ``node_features``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file's outputs lack ``node_features`` (the message gives the nequip-compile
            flags), or it was compiled for another device.
    """
    from nequip.integrations.utils import basic_transforms, handle_chemical_species_map
    from nequip.model.inference_models import load_compiled_model
    from nequip.nn import graph_model as gm

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    _check_device(device)
    try:
        model, metadata = load_compiled_model(str(path), device)
    except RuntimeError as exc:
        if "compiled for" in str(exc):
            raise ValueError(str(exc)) from None
        raise
    output_keys = None
    if path.name.endswith(".nequip.pt2"):
        from nequip.utils.aoti_metadata import NEQUIP_AOTI_OUTPUTS_KEY, parse_aoti_keys

        output_keys = parse_aoti_keys(metadata[NEQUIP_AOTI_OUTPUTS_KEY])
        if LATENT_FIELD not in output_keys:
            raise ValueError(
                f"{path} was compiled without the latent features '{LATENT_FIELD}' among its outputs "
                f"(it has {output_keys}), so LTAU cannot use it. Recompile the checkpoint with\n"
                f"  nequip-compile MODEL.ckpt {path.name} --device {metadata.get('AOTI_DEVICE_KEY', 'cpu')} "
                f"{NEQUIP_COMPILE_LATENT_FLAGS}\n"
                "or with `ltau compile MODEL ESTIMATOR OUTPUT` (which also puts LTAU in the model)"
            )
    species_map = handle_chemical_species_map(chemical_species_to_atom_type_map, metadata[gm.TYPE_NAMES_KEY])
    nl = {} if neighborlist_backend is None else {"neighborlist_backend": neighborlist_backend}
    transforms = basic_transforms(metadata, metadata[gm.R_MAX_KEY], metadata[gm.TYPE_NAMES_KEY], species_map, **nl)
    calc = CompiledLatentNequIPCalculator(model, device, metadata, output_keys, transforms=transforms, **kwargs)
    calc.model_path = path
    return calc


_MAX_METADATA_BYTES = 1 << 20


def recorded_source_sha256(path: PathLike) -> str:
    """SHA-256 of the checkpoint a compiled file was made from (its ``ltau_source`` metadata).

    AOTI ``.nequip.pt2`` files are zip archives whose ``*wrapper_metadata.json`` member holds the
    metadata: it is read (at most 1 MiB) without loading the compiled code. TorchScript files and
    files from plain ``nequip-compile`` carry no ``ltau_source``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not readable as an AOTI archive, or no recorded source checkpoint.
    """
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    hint = ("so it cannot be matched to the estimator's model; compile the checkpoint with `ltau compile` "
            "(which records the checkpoint's sha256), or pass allow_model_mismatch=True")
    if not path.name.endswith(".nequip.pt2"):
        raise ValueError(f"{path} is a TorchScript file, which records no source checkpoint here, {hint}")
    try:
        with zipfile.ZipFile(path) as archive:
            members = [i for i in archive.infolist() if i.filename.endswith("wrapper_metadata.json")]
            if len(members) != 1 or members[0].file_size > _MAX_METADATA_BYTES:
                raise ValueError(f"{path} holds {len(members)} AOTI metadata members (expected one, <= 1 MiB)")
            with archive.open(members[0]) as fh:
                meta = json.loads(fh.read(_MAX_METADATA_BYTES + 1))
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable AOTI .nequip.pt2 archive ({exc})") from None
    source = _json_or_none(meta.get(SOURCE_METADATA_KEY)) if isinstance(meta, dict) else None
    if source is None or not isinstance(source.get("model_sha256"), str):
        raise ValueError(f"{path} records no source checkpoint (metadata '{SOURCE_METADATA_KEY}'; plain "
                         f"nequip-compile does not write it), {hint}")
    return source["model_sha256"]
