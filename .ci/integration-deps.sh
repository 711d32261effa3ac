# shellcheck shell=bash
# Installs what the integration tests need on a fresh Debian machine (run as root):
#   tests/test_npm_client.py  node + npm (on the machine), broker-client and esbuild from npm
#   tests/test_browser.py     Debian's chromium, Playwright for Python (never `playwright install`)
#   tests/test_proxy.py       Debian's nginx and caddy
#   tests/test_postgres.py    Debian's postgresql (the tests run their own throwaway cluster;
#                             the package's own cluster is not used), and the API and
#                             stream tests on PostgreSQL
#   tests/test_units.py       systemd-analyze; python3-seccomp for /usr/bin/python3 (the
#                             units' system call filters); python3-venv (the README's
#                             install recipe makes a venv with the system's python3)
# Sourced by .ci/run after the venv is activated. Idempotent and quick when everything is there.
# A failed step only warns: the tests it serves then skip and say why (with CI=true a skip
# fails the run: see tests/conftest.py).

_deps_warn() { echo "integration-deps: $*" >&2; }

_deps_apt() {
    local missing=()
    [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx)
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    command -v caddy >/dev/null 2>&1 || missing+=(caddy)
    command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
    /usr/bin/python3 -c 'import seccomp' 2>/dev/null || missing+=(python3-seccomp)
    /usr/bin/python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        _deps_warn "not root, cannot apt-get install ${missing[*]}"
        return 0
    fi
    # The package lists may be missing or stale on a fresh machine: update once on failure.
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >/dev/null ||
        { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; } ||
        _deps_warn "apt-get install ${missing[*]} failed"
}

_deps_playwright() {
    python -c 'import playwright' 2>/dev/null && return 0
    python -m pip install -q playwright || _deps_warn "pip install playwright failed"
}

_deps_npm() {
    local dir
    dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/../tests/npm" && pwd)"
    command -v npm >/dev/null 2>&1 || { _deps_warn "no npm; the npm client test will skip"; return 0; }
    [ -f "$dir/node_modules/broker-client/package.json" ] &&
        [ -f "$dir/node_modules/esbuild/package.json" ] && return 0
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || _deps_warn "npm ci failed"
}

_deps_apt
_deps_playwright
_deps_npm
unset -f _deps_warn _deps_apt _deps_playwright _deps_npm
