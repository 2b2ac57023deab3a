#!/usr/bin/env bash
# Make sure <repo>/.venv exists and has this project installed (pip install -e ".[test,hf,plot]").
#
#   bash scripts/ensure_env.sh        # or: source scripts/ensure_env.sh
#
# Works from any cwd. Installs the exact tested versions (constraints.txt; setup.py states ranges).
# Re-installs only when setup.py or constraints.txt changed since the last successful install
# (their sha256 and the extras, kept in .venv/.ders-stamp), so an up-to-date run is quick and silent.
# Exports nothing: callers run "<repo>/.venv/bin/python" themselves.

# Sourced: do the work in a child bash so that `set -e` / `exit` never touch the caller's shell.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    bash "${BASH_SOURCE[0]}" "$@"
    return $?
fi

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.ders-stamp"
EXTRAS="test,hf,plot,deepspeed"
cd "$ROOT"   # so pyenv honours the repo's .python-version

log() { printf 'ensure_env: %s\n' "$*" >&2; }

# True when "$1" runs and is CPython >= 3.12.
py_ok() {
    [[ -n "${1:-}" && -x "$1" ]] || return 1
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local cand root
    if command -v pyenv >/dev/null 2>&1; then
        cand="$(pyenv which python3.12 2>/dev/null || true)"
        if py_ok "$cand"; then printf '%s\n' "$cand"; return 0; fi
        root="$(pyenv root 2>/dev/null || true)"
    fi
    # pyenv installs even when pyenv itself is not on PATH; newest 3.12.x first.
    for root in "${root:-}" "${PYENV_ROOT:-}" "${HOME:-/nonexistent}/.pyenv"; do
        [[ -n "$root" && -d "$root/versions" ]] || continue
        while IFS= read -r cand; do
            if py_ok "$cand"; then printf '%s\n' "$cand"; return 0; fi
        done < <(ls -d "$root"/versions/3.12*/bin/python3 2>/dev/null | sort -rV)
    done
    cand="$(command -v python3.12 2>/dev/null || true)"
    if py_ok "$cand"; then printf '%s\n' "$cand"; return 0; fi
    cand="$(command -v python3 2>/dev/null || true)"
    if py_ok "$cand"; then printf '%s\n' "$cand"; return 0; fi
    return 1
}

file_sha256() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        "$VPY" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
    fi
}

# 1) a usable .venv: keep a working one, (re)create a missing or broken one.
if ! py_ok "$VPY"; then
    if ! PY="$(find_python)"; then
        cat >&2 <<'MSG'
ensure_env: no Python >= 3.12 found (looked at `pyenv which python3.12`,
  $(pyenv root)/versions/3.12*/bin/python3, python3.12 and python3 on PATH).
  Install one, then run this again:
    pyenv install 3.12.1            # the version in .python-version
  or the distro package, e.g.
    apt-get install python3.12 python3.12-venv
MSG
        exit 1
    fi
    if [[ -e "$VENV" ]]; then
        log "$VENV exists but its python is missing or older than 3.12; recreating it with $PY"
        "$PY" -m venv --clear "$VENV"
    else
        log "creating $VENV with $PY ($("$PY" -c 'import platform; print(platform.python_version())'))"
        "$PY" -m venv "$VENV"
    fi
    rm -f "$STAMP"
    "$VPY" -m pip install -q --upgrade pip
fi

# 2) install the project when setup.py changed since the last successful install.
want="$(file_sha256 "$ROOT/setup.py") $(file_sha256 "$ROOT/constraints.txt") extras=$EXTRAS"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" != "$have" ]]; then
    log "installing -e \".[$EXTRAS]\" into $VENV (first run downloads torch; this can take a while)"
    "$VPY" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[$EXTRAS]"
    printf '%s\n' "$want" > "$STAMP"
fi
