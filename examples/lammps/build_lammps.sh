#!/usr/bin/env bash
# Build LAMMPS with pair_style nequip (mir-group/pair_nequip_allegro) against the torch of a Python venv.
#
#   examples/lammps/build_lammps.sh [BUILD_DIR]
#
# Fetches nothing from the network: both sources are cloned from local git repositories
#   LAMMPS_SRC  (default: the first of /work/.mirror/lammps+lammps/repo, /work/.mirror/stanmoore1+lammps/repo)
#   PAIR_SRC    (default: /work/.mirror/mir-group+pair_nequip_allegro/repo)
# Either may be a plain clone you made yourself (git clone https://github.com/lammps/lammps, ...).
# Other settings: PYTHON (the venv's python, default /work/main/.venv/bin/python), JOBS (default 2),
# AOT (ON|OFF, default ON: AOTInductor .nequip.pt2 models; TorchScript .nequip.pth needs torch < 2.10).
# The executable ends up at BUILD_DIR/lammps/build/lmp. Minimal packages: core LAMMPS only (pair nequip,
# compute nequip/atom, fix halt, dump custom, fix nve and velocity are all core or added by the patch).
set -euo pipefail

SCRIPT_DIR=$(dirname "$(realpath "$0")")
BUILD_DIR=$(realpath -m "${1:-/work/build/lammps}")
PYTHON=${PYTHON:-/work/main/.venv/bin/python}
JOBS=${JOBS:-2}
AOT=${AOT:-ON}
if [[ -z "${LAMMPS_SRC:-}" ]]; then
  for c in /work/.mirror/lammps+lammps/repo /work/.mirror/stanmoore1+lammps/repo; do
    [[ -d "$c" ]] && LAMMPS_SRC=$c && break
  done
fi
PAIR_SRC=${PAIR_SRC:-/work/.mirror/mir-group+pair_nequip_allegro/repo}
[[ -n "${LAMMPS_SRC:-}" && -d "$LAMMPS_SRC" ]] || { echo "no LAMMPS source: set LAMMPS_SRC to a local clone of lammps/lammps" >&2; exit 2; }
[[ -d "$PAIR_SRC" ]] || { echo "no pair_nequip_allegro source at $PAIR_SRC: set PAIR_SRC" >&2; exit 2; }
[[ -x "$PYTHON" ]] || { echo "no python at $PYTHON: set PYTHON to the venv's python" >&2; exit 2; }

mkdir -p "$BUILD_DIR"
cd "$BUILD_DIR"
if [[ ! -d lammps ]]; then
  # sparse: only what the CMake build reads (a mirror may lack the large example/bench data files)
  git clone --quiet --no-checkout "$LAMMPS_SRC" lammps
  git -C lammps sparse-checkout set --no-cone '/cmake/' '/src/' '/lib/' '/LICENSE' '/README' '/doc/lammps.1' '/doc/msi2lmp.1' '/tools/' '/unittest/CMakeLists.txt' '/potentials/'
  git -C lammps checkout --quiet
fi
[[ -d pair_nequip_allegro ]] || git clone --quiet "$PAIR_SRC" pair_nequip_allegro
echo "LAMMPS: $(git -C lammps log -1 --format='%h %cd' --date=short) $(grep -o '"[^"]*"' lammps/src/version.h | head -1)"
echo "pair_nequip_allegro: $(git -C pair_nequip_allegro log -1 --format='%h %cd' --date=short)"
if ! grep -q "find_package(Torch REQUIRED)" lammps/cmake/CMakeLists.txt; then
  (cd pair_nequip_allegro && ./patch_lammps.sh ../lammps)
  # serial build: LAMMPS' MPI STUBS before 10 Sep 2025 lack MPI_Comm_split_type, which the pair style
  # calls only with more than one rank; force-include a serial stand-in into that one file
  cp "$SCRIPT_DIR/mpi_stubs_compat.h" "$BUILD_DIR/mpi_stubs_compat.h"
  echo "set_source_files_properties(\${LAMMPS_SOURCE_DIR}/pair_nequip_allegro.cpp PROPERTIES COMPILE_OPTIONS \"-include;$BUILD_DIR/mpi_stubs_compat.h\")" >> lammps/cmake/CMakeLists.txt
fi

TORCH_PREFIX=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
echo "torch: $("$PYTHON" -c 'import torch; print(torch.__version__)') at $TORCH_PREFIX"
mkdir -p lammps/build
cd lammps/build
cmake ../cmake \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_MPI=OFF -DBUILD_OMP=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLAMMPS_EXCEPTIONS=ON -DPKG_GPU=OFF -DPKG_KOKKOS=OFF \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DMKL_INCLUDE_DIR=/tmp \
  -DNEQUIP_AOT_COMPILE="$AOT" >cmake.log 2>&1 || { tail -40 cmake.log; exit 1; }
grep -E "NEQUIP_AOT_COMPILE|Found Torch" cmake.log || true
nice -n 10 make -j"$JOBS" lmp
ls -l "$BUILD_DIR/lammps/build/lmp"
