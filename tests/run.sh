#!/usr/bin/env bash
# tests/run.sh - THE test command: `bash tests/run.sh [pytest args...]`
#
# On a Debian 12 machine as root it installs what the tests need (once; present packages are
# skipped), installs the project with its test extras, starts the local multi-node Slurm
# (slurm/start-local-slurm.sh), runs pytest and exits with pytest's exit code.
#
# Cluster reuse: a healthy cluster that was already running is reused and left running;
# a cluster this script started is stopped (and wiped) on exit. Under CI (CI=true) a
# separate directory and port range are used, so CI always starts clean and never touches a
# developer's cluster.
#
# Environment:
#   SLURM_LOCAL_ACCOUNTING=0   no MariaDB/slurmdbd (sacct off); default 1
#   HPCSERVE_SLURM=0           do not start Slurm (Slurm tests skip)
#   HPCSERVE_SGLANG_CHECK=0    skip installing the sglang parser-check extras
#   HPCSERVE_DYNAMO=0          skip installing NVIDIA Dynamo (the Dynamo stack tests then skip)
#   HPCSERVE_SKIP_INSTALL=1    skip apt-get and pip steps entirely
#   HPCSERVE_REQUIRE_INSTALLED set to 1 unless a component is opted out above: a test that would skip
#                              for a missing component (sglang, torch, sglang-router, Dynamo, ch-run, tmux) fails
#   HPCSERVE_VENV              virtual environment to install into and run from (default: REPO/.venv;
#                              created with PYTHON if missing). The machine's own Python is left alone.
#   PYTHON                     interpreter that creates the venv (default: python3, else python)
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export PATH=$PATH:/usr/sbin:/sbin
export SLURM_LOCAL_ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
# the largest example recipe (deepseek-2p4d) needs 9 nodes for sbatch --test-only
export SLURM_LOCAL_NODES=${SLURM_LOCAL_NODES:-10}
if [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then
  export SLURM_LOCAL_DIR=${SLURM_LOCAL_DIR:-/tmp/hpcserve-slurm-ci}
  export SLURM_LOCAL_PORT_BASE=${SLURM_LOCAL_PORT_BASE:-17910}
fi
export SLURM_LOCAL_DIR=${SLURM_LOCAL_DIR:-/tmp/hpcserve-slurm}
BASE_PY=${PYTHON:-$(command -v python3 || command -v python)}
VENV=${HPCSERVE_VENV:-$REPO/.venv}
PY=$VENV/bin/python

T_ALL=$(date +%s.%N)
TIMINGS=()
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
say() { printf '[tests/run.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
phase_done() { TIMINGS+=("$1: $(since "$2")s"); say "phase $1 done in $(since "$2")s"; }
fail() { say "ERROR: $*"; exit 1; }

# ------------------------------------------------------------------ phase: apt packages
dpkg_installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
install_apt_packages() {
  # charliecloud-runtime: ch-run, the unprivileged container runtime of tests/slurm/test_containers_charliecloud.py
  # tmux: tests/control/test_top.py drives `hpcserve top` in a terminal (send-keys, capture-pane)
  local want=(slurmctld slurmd slurm-client munge redis-server iproute2 procps charliecloud-runtime tmux)
  [ "$SLURM_LOCAL_ACCOUNTING" = 1 ] && want+=(slurmdbd mariadb-server mariadb-client)
  command -v dpkg-query >/dev/null 2>&1 || { say "no dpkg here; skipping apt packages"; return 0; }
  local missing=() p
  for p in "${want[@]}"; do dpkg_installed "$p" || missing+=("$p"); done
  if [ "${#missing[@]}" = 0 ]; then say "apt packages already present"; return 0; fi
  [ "$(id -u)" = 0 ] || fail "missing Debian packages ${missing[*]}; as root run: apt-get install ${missing[*]}"
  say "apt-get install ${missing[*]}"
  # keep package scripts from starting system-wide munge/slurm/redis/mariadb services
  local added_policy=0 ok=0 attempt
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; added_policy=1
  fi
  for attempt in 1 2 3; do
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
         -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}"; then ok=1; break; fi
    say "apt-get failed (attempt $attempt); retrying"; sleep 5
  done
  [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$ok" = 1 ] || fail "apt-get install ${missing[*]} failed"
}

# ------------------------------------------------------------------ phase: venv
# Everything is installed into one virtual environment; the machine's Python is never changed.
make_venv() {
  if [ -x "$PY" ] && "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; then
    say "using the virtual environment $VENV"; return 0
  fi
  say "creating the virtual environment $VENV"
  "$BASE_PY" -m venv "$VENV" || fail "$BASE_PY -m venv $VENV failed (Debian: apt-get install python3-venv)"
  "$PY" -m pip install -q --disable-pip-version-check --upgrade pip || fail "pip upgrade in $VENV failed"
}

# ------------------------------------------------------------------ phase: pip
# pip install -e '.[test]' runs again only when pyproject.toml, the repo path or the
# interpreter changed (stamp file), or when hpcserve does not import from this repo.
install_project() {
  "$PY" -m pip --version >/dev/null 2>&1 || fail "$PY has no pip; install python3-pip or set PYTHON"
  local stamp_dir=${XDG_CACHE_HOME:-$HOME/.cache}/hpcserve
  local stamp_file
  stamp_file=$stamp_dir/pip-$(printf '%s' "$REPO" | sha256sum | cut -c1-16)
  local want
  want="$("$PY" -c 'import sys; print(sys.executable)') $REPO $(sha256sum pyproject.toml | cut -c1-64)"
  local where
  where=$(cd / && "$PY" -c 'import hpcserve, os; print(os.path.dirname(os.path.dirname(os.path.abspath(hpcserve.__file__))))' 2>/dev/null || true)
  if [ "$where" = "$REPO" ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$want" ]; then
    say "project already installed (editable, $REPO)"; return 0
  fi
  say "pip install -e '.[test]'"
  "$PY" -m pip install -q --disable-pip-version-check -e ".[test]" || fail "pip install -e '.[test]' failed"
  mkdir -p "$stamp_dir" && echo "$want" > "$stamp_file"
}

# ------------------------------------------------------------------ phase: sglang extras
# >>> install_sglang_check_deps: TO BE FILLED IN by the engineer who owns the sglang parser
# checks. It should make `import sglang` work for the parser-check tests on CPU:
#   "$PY" -m pip install --no-deps sglang==0.5.23
#   "$PY" -m pip install torch==2.13.0            # the CPU wheel on this machine kind
#   plus the light dependencies the parser modules import.
# Return non-zero on failure: the caller turns that into a warning, never a fatal error.
install_sglang_check_deps() {
  local pin=0.5.23
  local probe="import importlib.metadata as m, sys; from sglang.srt.server_args import ServerArgs; import transformers, datasets, sentencepiece, gguf, compressed_tensors, tvm_ffi; sys.exit(m.version('sglang') != '$pin')"
  if (cd / && "$PY" -c "$probe" >/dev/null 2>&1); then
    say "sglang $pin parser already importable"; return 0
  fi
  # CPU torch: pip finds the CPU wheel through this machine's find-links (/opt/wheels). Only when no
  # torch imports at all, so a large CUDA build is never pulled in by accident.
  if ! (cd / && "$PY" -c 'import torch' >/dev/null 2>&1); then
    say "pip install torch==2.13.0 (CPU wheel)"
    "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore torch==2.13.0 || return 1
  fi
  # What sglang.srt.server_args imports, found by importing it in an empty venv. sglang's declared
  # requirements (CUDA kernels, transformers, ...) are not needed to parse and are skipped (--no-deps).
  say "pip install sglang==$pin --no-deps plus its parser-time imports (triton is ~1 GB)"
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore triton==3.9.0 msgspec pybase64 'pyzmq>=25.1.2' \
      tqdm numpy orjson packaging pillow psutil requests aiohttp ipython pydantic starlette \
      transformers==5.19.0 datasets sentencepiece gguf compressed-tensors apache-tvm-ffi || return 1  # + bench_serving imports
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps "sglang==$pin" || return 1
  (cd / && "$PY" -c "$probe") || { say "sglang $pin installed but its server_args does not import"; return 1; }
}
# <<< install_sglang_check_deps

# >>> install_dynamo (owner: issue 19). NVIDIA Dynamo 1.6.1 for the Dynamo stack tests (frontend + mocker).
# The ai-dynamo wheel depends on aisimulate, whose install step downloads from outside and fails offline:
# install ai-dynamo and ai-dynamo-runtime with --no-deps, then their other dependencies (pyproject extra
# `dynamo`) with the venv's torch, pydantic, tokenizers and numpy held where they are. ai-dynamo-runtime asks
# for pydantic<=2.13.5; the frontend and mocker run with the venv's newer pydantic, so `pip check` keeps
# reporting that line (and aisimulate) on purpose. transformers follows sglang 0.5.23's pin.
install_dynamo() {
  local pin=1.6.1
  local probe="import importlib.metadata as m, sys; import dynamo.frontend.frontend_args, dynamo.mocker.args, transformers, kubernetes; sys.exit(m.version('ai-dynamo') != '$pin')"
  if (cd / && "$PY" -c "$probe" >/dev/null 2>&1); then
    say "ai-dynamo $pin already importable"; return 0
  fi
  say "pip install --no-deps ai-dynamo==$pin ai-dynamo-runtime==$pin, then '.[dynamo]'"
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps \
      "ai-dynamo==$pin" "ai-dynamo-runtime==$pin" || return 1
  local cons
  cons=$(mktemp) || return 1
  "$PY" -m pip freeze 2>/dev/null | grep -iE '^(torch|pydantic|pydantic[-_]core|tokenizers|numpy)==' > "$cons"
  echo "transformers==5.19.0" >> "$cons"
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -c "$cons" -e ".[dynamo]" \
    || { rm -f "$cons"; return 1; }
  rm -f "$cons"
  local m
  for m in dynamo.frontend dynamo.mocker; do
    (cd / && "$PY" -m "$m" --help >/dev/null 2>&1) || { say "python -m $m --help fails after the install"; return 1; }
  done
}
# <<< install_dynamo

# ------------------------------------------------------------------ run
if [ "${HPCSERVE_SKIP_INSTALL:-0}" != 1 ]; then
  t=$(now); install_apt_packages; phase_done apt "$t"
  t=$(now); make_venv; phase_done venv "$t"
  t=$(now); install_project; phase_done pip "$t"
  if [ "${HPCSERVE_SGLANG_CHECK:-1}" != 0 ]; then
    t=$(now)
    install_sglang_check_deps || fail "install_sglang_check_deps failed: the sglang parser checks need it (HPCSERVE_SGLANG_CHECK=0 skips them on purpose)"
    phase_done sglang-deps "$t"
  fi
  if [ "${HPCSERVE_DYNAMO:-1}" != 0 ]; then
    t=$(now)
    install_dynamo || fail "install_dynamo failed: the Dynamo stack tests need ai-dynamo (HPCSERVE_DYNAMO=0 skips them on purpose)"
    phase_done dynamo "$t"
  fi
fi

[ -x "$PY" ] || fail "no virtual environment at $VENV (run without HPCSERVE_SKIP_INSTALL=1 once)"
export PATH=$VENV/bin:$PATH VIRTUAL_ENV=$VENV
STARTED_SLURM=0
stop_cluster() {
  local rc=$?
  if [ "$STARTED_SLURM" = 1 ]; then
    local t; t=$(now)
    bash "$REPO/slurm/stop-local-slurm.sh" --purge || say "WARNING: stopping the local Slurm failed"
    phase_done slurm-stop "$t"
  fi
  say "timings: ${TIMINGS[*]:-none}; total $(since "$T_ALL")s"
  exit "$rc"
}
trap stop_cluster EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "${HPCSERVE_SLURM:-1}" != 0 ]; then
  t=$(now)
  if out=$(bash "$REPO/slurm/start-local-slurm.sh" --check 2>/dev/null); then
    say "reusing the running local Slurm in $SLURM_LOCAL_DIR (left running afterwards)"
  else
    STARTED_SLURM=1
    if ! out=$(bash "$REPO/slurm/start-local-slurm.sh"); then
      tail -n 30 "$SLURM_LOCAL_DIR"/log/*.log 2>/dev/null >&2 || true
      fail "the local Slurm did not start (logs above)"
    fi
  fi
  eval "$out"
  export HPCSERVE_REQUIRE_SLURM=1   # from here on an unreachable cluster fails Slurm tests
  say "SLURM_CONF=$SLURM_CONF"
  phase_done slurm-start "$t"
else
  say "HPCSERVE_SLURM=0: no local Slurm; Slurm tests will skip"
fi

# Paths given on the command line replace the default `tests` (else pytest would collect
# the named files twice or run the whole suite).
targets=(tests)
for a in "$@"; do
  case "$a" in -*) ;; *) [ -e "${a%%::*}" ] && targets=() ;; esac
done
t=$(now)
rc=0
# Everything installed above is required: a test that would skip for a missing component fails instead
# (tests/conftest.py). Opting out of a component (HPCSERVE_SGLANG_CHECK=0, HPCSERVE_DYNAMO=0) lifts that.
if [ "${HPCSERVE_SGLANG_CHECK:-1}" != 0 ] && [ "${HPCSERVE_DYNAMO:-1}" != 0 ]; then
  export HPCSERVE_REQUIRE_INSTALLED=${HPCSERVE_REQUIRE_INSTALLED:-1}
fi
"$PY" -m pytest -q -rs --continue-on-collection-errors -p no:cacheprovider "${targets[@]}" "$@" || rc=$?
phase_done pytest "$t"
exit "$rc"
