"""Write a structure's model inputs for ``aoti_check`` (the C++ loader check) and print the Python result.

    python dump_inputs.py MODEL.nequip.pt2 STRUCTURE OUTDIR

Writes OUTDIR/<input>.bin (raw arrays) and OUTDIR/spec.txt (name dtype shape, in the model's input
order), runs the model in Python and prints its ``ltau_uncertainty`` for comparison with
``aoti_check MODEL.nequip.pt2 OUTDIR``.
"""
import sys
from pathlib import Path

from ase.io import read
from nequip.data import from_ase
from nequip.integrations.utils import basic_transforms
from nequip.model.inference_models import load_compiled_model


def main(model_path: str, structure: str, outdir: str) -> None:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = load_compiled_model(model_path, "cpu")
    names = meta["type_names"]
    data = from_ase(read(structure))
    for t in basic_transforms(meta, meta["r_max"], names, {t: t for t in names}):
        data = t(data)
    lines = []
    for key in meta["nequip_aoti_inputs"].split():
        arr = data[key].detach().contiguous().numpy()
        arr.tofile(out / f"{key}.bin")
        lines.append(f"{key} {arr.dtype} {' '.join(map(str, arr.shape))}")
    (out / "spec.txt").write_text("\n".join(lines))
    print("python ltau_uncertainty:", model(data)["ltau_uncertainty"].detach().reshape(-1).numpy())


if __name__ == "__main__":
    main(*sys.argv[1:4])
