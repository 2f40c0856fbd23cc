# Sourced by scripts/demo, scripts/test, scripts/bench: creates or refreshes .venv.
# Usage: bootstrap [EXTRAS]   (e.g. bootstrap dev). Reinstalls when pyproject.toml changes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

pick_python() {
    for candidate in "${PYTHON:-}" python3.12 python3.11 python3 python; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
           "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    echo "puller needs Python 3.11 or newer; install it or set PYTHON=/path/to/python3.11" >&2
    return 1
}

bootstrap() {
    local extras="${1:-}"
    local spec="$ROOT"
    [ -n "$extras" ] && spec="$ROOT[$extras]"
    local stamp="$VENV/.puller-installed-$extras"
    local want
    want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    if [ ! -x "$VENV/bin/python" ]; then
        local python; python="$(pick_python)"
        echo "==> creating .venv with $($python --version)" >&2
        "$python" -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "==> installing puller${extras:+ with [$extras]} into .venv" >&2
        "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
        "$VENV/bin/python" -m pip install --quiet -e "$spec" >&2
        echo "$want" > "$stamp"
    fi
}
