#!/usr/bin/env bash
# Install the NLP subsolver that solver/minlp.py's MindtPy (Outer Approximation) needs:
# cyipopt built against Debian's Ipopt, plus PyNumero's ASL library, which Pyomo's cyipopt
# interface loads and which `pyomo build-extensions` would download (no internet here), so it
# is compiled from the source Pyomo ships against Debian's libamplsolver.
#
# Idempotent; exits 0 with a message when it cannot install (no apt, not root, no compiler):
# the MINLP then works with solver="scip" only and its MindtPy tests skip.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

say() { echo "install_ipopt: $*"; }

if [ ! -x "$PY" ]; then
    say "no $PY (run scripts/setup.sh first); skipped"; exit 0
fi
if ! "$PY" -c "import pyomo" 2>/dev/null; then
    "$PY" -m pip install -q "pyomo>=6.10" || { say "cannot install pyomo; skipped"; exit 0; }
fi

LIB=$("$PY" -c "import sys; print(sys.prefix)")/lib/libpynumero_ASL.so
ready() {
    "$PY" - <<'EOF' 2>/dev/null
import sys
from latprune.solver.minlp import nlp_subsolver_available
ok, why = nlp_subsolver_available()
sys.exit(0 if ok else 1)
EOF
}
if ready; then say "cyipopt and PyNumero's ASL library already work"; exit 0; fi

# 1. Debian packages: Ipopt (headers, lib), BLAS/LAPACK link names, the AMPL solver library.
PKGS="coinor-libipopt-dev pkg-config liblapack-dev libblas-dev libamplsolver-dev g++"
missing=""
for p in $PKGS; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
            say "need root or sudo to apt-get install$missing; skipped"; exit 0
        fi
    fi
    if ! command -v apt-get >/dev/null; then
        say "no apt-get to install$missing; skipped"; exit 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get install -y -q $missing >/dev/null 2>&1; then
        $SUDO apt-get update -q >/dev/null 2>&1
        $SUDO apt-get install -y -q $missing >/dev/null 2>&1 \
            || { say "apt-get install$missing failed; skipped"; exit 0; }
    fi
fi

# 2. cyipopt (compiled against the Debian Ipopt found by pkg-config) and scipy (PyNumero).
if ! "$PY" -c "import cyipopt, scipy" 2>/dev/null; then
    "$PY" -m pip install -q cyipopt scipy \
        || { say "pip install cyipopt scipy failed; skipped"; exit 0; }
fi

# 3. PyNumero's ASL interface, from Pyomo's own source, into the venv.
SRC=$("$PY" -c "import os, pyomo.contrib.pynumero as p; print(os.path.dirname(p.__file__))")/src
if [ ! -f "$LIB" ] || [ "$SRC/AmplInterface.cpp" -nt "$LIB" ]; then
    mkdir -p "$(dirname "$LIB")"
    g++ -O2 -fPIC -shared -DBUILDING_PYNUMERO_ASL -I/usr/include/ampl-netlib-solvers -I"$SRC" \
        "$SRC/AmplInterface.cpp" -o "$LIB.tmp" -lamplsolver -ldl \
        && mv "$LIB.tmp" "$LIB" || { say "building $LIB failed; skipped"; exit 0; }
fi

if ready; then
    say "ok: cyipopt + $LIB"
else
    say "installed, but MindtPy's cyipopt still does not load"
fi
exit 0
