"""README.md cannot drift: its numbered usage steps run verbatim on the quick demo's data, and every
`ltau` flag it shows exists in `ltau <command> --help`.

The steps are extracted from README.md itself (section "## Using it", paragraphs "**1.", "**2.", ...):
their ```python and ```bash blocks run in order in one working directory laid out as a user's would be
(``train.extxyz``, ``val.extxyz``, ``runs/seedI/{last.ckpt,best.ckpt,ltau_errors}``, structure files),
made of links to the quick demo's output. A block preceded by ``<!-- readme-test: skip ... -->`` is not
run (only the training loop, whose runs the demo provides).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"(<!--\s*readme-test:\s*skip[^>]*-->\s*\n)?```(\w+)\n(.*?)\n```", re.S)


def usage_steps(text: str) -> list[tuple[int, list[tuple[str, str, bool]]]]:
    """``[(step number, [(language, code, skipped), ...]), ...]`` of the README's "Using it" section."""
    section = text.split("\n## Using it\n", 1)[1]
    section = re.split(r"\n#{2,3} ", section, maxsplit=1)[0]
    parts = re.split(r"^\*\*(\d+)\.", section, flags=re.M)
    steps = []
    for number, body in zip(parts[1::2], parts[2::2]):
        blocks = [(m.group(2), m.group(3), m.group(1) is not None) for m in FENCE.finditer(body)]
        steps.append((int(number), blocks))
    return steps


def shown_commands(text: str) -> list[str]:
    """Every `ltau ...` command line of the README's bash blocks (continuation lines joined)."""
    commands = []
    for m in FENCE.finditer(text):
        if m.group(2) != "bash":
            continue
        for line in m.group(3).replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("ltau "):
                commands.append(line)
    return commands


def _help_texts() -> dict[str, str]:
    from ltau_ase.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: p.format_help() for name, p in sub.choices.items()}


def test_readme_steps_are_numbered_and_hold_code():
    steps = usage_steps(README.read_text(encoding="utf-8"))
    assert [n for n, _ in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 5
    assert all(any(lang in ("python", "bash") for lang, _, _ in blocks) for _, blocks in steps)
    skipped = [code for _, blocks in steps for _, code, skip in blocks if skip]
    assert len(skipped) == 1 and "nequip-train" in skipped[0]  # only the training loop is not run


def test_every_ltau_flag_in_the_readme_is_in_its_help():
    text = README.read_text(encoding="utf-8")
    helps = _help_texts()
    commands = shown_commands(text)
    assert {c.split()[1] for c in commands} >= {"fit", "relax", "report", "md", "reweight"}
    for command in commands:
        sub = command.split()[1]
        assert sub in helps, f"README shows unknown subcommand: {command}"
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}\b", helps[sub]), f"`ltau {sub} --help` lacks {flag}"
    # flags mentioned in the prose (`--atol`, `--skip-epochs S`, ...) exist in some subcommand
    every = "\n".join(helps.values())
    for flag in set(re.findall(r"`(--[a-z][a-z0-9-]*)", text)):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}\b", every), f"no ltau subcommand has {flag}"


def test_cli_unknown_species_choices_are_the_estimator_vocabulary():
    from ltau_ase.cli.options import UNKNOWN_SPECIES_CHOICES
    from ltau_ase.core.estimator import UNKNOWN_SPECIES_POLICIES

    assert UNKNOWN_SPECIES_CHOICES == UNKNOWN_SPECIES_POLICIES


def _link(src: Path, dst: Path) -> None:
    assert src.exists(), src
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src.resolve())


@pytest.fixture(scope="module")
def user_dir(quick_demo_dir, tmp_path_factory):
    """A working directory laid out as the README assumes, from the quick demo's data and runs."""
    from ase.io import read, write

    work = tmp_path_factory.mktemp("readme_user")
    data = quick_demo_dir / "data"
    _link(data / "train.extxyz", work / "train.extxyz")
    _link(data / "val.extxyz", work / "val.extxyz")
    for i in (1, 2, 3):
        member = quick_demo_dir / "models" / f"member{i}"
        for name in ("last.ckpt", "best.ckpt"):
            _link(member / "run" / name, work / "runs" / f"seed{i}" / name)
        _link(member / "ltau_errors", work / "runs" / f"seed{i}" / "ltau_errors")
    initial = read(data / "is2rs_id_initial.extxyz", ":")
    relaxed = read(data / "is2rs_id_relaxed.extxyz", ":")
    for a in initial + relaxed:
        a.info.setdefault("name", a.info["system"])
    write(work / "initial.extxyz", initial[0])
    write(work / "hot.extxyz", initial[1])
    write(work / "is2rs_init.extxyz", initial[:2])  # two systems keep the batch step short
    write(work / "is2rs_relaxed.extxyz", relaxed[:2])
    return work


@pytest.mark.slow
def test_readme_usage_steps_run_verbatim(user_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    ran = []
    pending_python: list[str] = []

    def run(lang: str, code: str) -> None:
        cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-e", "-c", code]
        proc = subprocess.run(cmd, cwd=user_dir, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README {lang} block failed:\n{code}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        ran.append((lang, proc.stdout))

    for _, blocks in usage_steps(README.read_text(encoding="utf-8")):
        for lang, code, skipped in blocks:
            if skipped or lang not in ("python", "bash"):
                continue
            if lang == "python":  # consecutive python blocks share one interpreter (step 4 uses step 3's atoms)
                pending_python.append(code)
                continue
            if pending_python:
                run("python", "\n".join(pending_python))
                pending_python = []
            run(lang, code)
    if pending_python:
        run("python", "\n".join(pending_python))

    # step 1 wrote the ensemble's configs; step 2 fitted for the checkpoint the later steps load
    assert sorted(p.name for p in (user_dir / "configs").iterdir()) == ["member1.yaml", "member2.yaml", "member3.yaml"]
    from ltau_ase.core.estimator import LTAUEstimator

    est = LTAUEstimator.load(str(user_dir / "model.ltau"))
    last = (user_dir / "runs" / "seed1" / "last.ckpt").read_bytes()
    assert est.metadata["model_sha256"] == hashlib.sha256(last).hexdigest() and est.k == 10
    # steps 3 and 4 printed the observer summary; step 5 wrote the database, the report and the outputs
    assert any("'nsteps'" in out for lang, out in ran if lang == "python")
    assert (user_dir / "relax.traj").stat().st_size > 0
    metrics = json.loads((user_dir / "report" / "metrics.json").read_text())
    assert metrics["n_records"] == 2
    assert (user_dir / "report" / "rmsd_vs_uq.png").stat().st_size > 0
    assert (user_dir / "weighted.extxyz").stat().st_size > 0
