#!/usr/bin/env bash
# Stockade developer entry point.  Every command installs what it needs first
# (Debian packages and a Python venv in .venv), so a fresh machine needs
# nothing done by hand.
#
#   ./dev.sh demo            one-node filter demo in network namespaces
#   ./dev.sh test [ARGS]     lint, type-check and the whole default test suite
#   ./dev.sh setup           only install
#   ./dev.sh shell           a shell with the venv activated
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
    gcc libc6-dev libnetfilter-queue-dev libnfnetlink-dev   # build NetfilterQueue
    iptables nftables conntrack iproute2 iputils-ping tcpdump procps iperf3
    etcd-server etcd-client                                # cluster membership store
    prometheus                                             # promtool, scrape test
    mmdebstrap docker-compose                              # compose lab base image
    conntrackd keepalived                                  # side-by-side baselines
)
VENV=.venv
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

setup_apt() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

setup_venv() {
    local stamp="$VENV/.stockade-installed" want
    want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    log "creating Python environment in $VENV"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    # Exact versions from constraints.txt: a new release on PyPI must not change
    # what the tests run against (the generated gRPC code names its generator).
    "$VENV/bin/pip" install -q -c constraints.txt -e ".[test]"
    echo "$want" > "$stamp"
}

setup() { setup_apt; setup_venv; }

cmd="${1:-help}"
shift || true
case "$cmd" in
    setup) setup ;;
    demo)
        setup
        exec "$VENV/bin/stockade" demo "$@"
        ;;
    test)
        setup
        log "ruff"
        "$VENV/bin/ruff" check node syncd cluster chaos tests
        "$VENV/bin/ruff" format --check node syncd cluster chaos tests
        log "mypy"
        "$VENV/bin/mypy" node syncd cluster chaos
        log "pytest"
        exec "$VENV/bin/pytest" -m "not chaos" "$@"
        ;;
    shell)
        setup
        exec bash --rcfile <(echo "source $VENV/bin/activate")
        ;;
    *)
        sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
        [ "$cmd" = help ] || exit 2
        ;;
esac
