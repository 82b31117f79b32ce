#!/usr/bin/env bash
# Entry point of every lab container (docker-compose.yml): name this
# container's interfaces, set its routes, then run its program.
#
#   stockade-entrypoint [--ifname NAME=SUBNET]... [--route DEST=GW[,GW...]]...
#                       [--rto-min NAME=TIME]... [-- CMD [ARG...]]
#
# --ifname  rename the interface that carries SUBNET (its connected route,
#           e.g. 10.77.10.0/24) to NAME.  Give them before --route.
# --route   add a route; several gateways make an ECMP (multipath) route,
#           with the next hops in the order given.  DEST "default" replaces
#           the default route.
# --rto-min give the connected route of interface NAME a TCP retransmission
#           floor (e.g. up0=10ms): the sync streams run over it.
# CMD       the program to run (exec'd, so it gets the signals); without one
#           the container idles until stopped.
#
# Why each piece exists:
# - Interface names: a node's VIPs are configured per interface (up0,
#   down0 in docker/lab/fw*.yaml), but Docker names a container's interfaces
#   eth0, eth1... in an order it does not promise (it has varied with the
#   network names and engine versions).  The subnet is what the compose file
#   fixes, so the name is derived from it, before any program starts.
#   Docker attaches fresh interfaces at every (re)start, so this runs each time.
# - Routes: the lab routes through its routers and firewall nodes, not
#   through Docker's bridge, so routes are set here (containers have
#   NET_ADMIN).  The routers' multipath next hops are the nodes' VIPs, which
#   the cluster agents move between nodes with a gratuitous ARP: a router
#   needs no neighbour tricks to stop using a dead node (docs/compose-lab.md).
# - rto_min: Linux waits at least 200 ms before it retransmits a lost TCP
#   segment; on a LAN a sync stream should not stall that long behind one
#   lost packet (docs/syncd.md, "Sync links").  Only this container's own
#   TCP (sync, etcd) uses the route's metric; forwarded traffic does not.
set -euo pipefail

log() { printf 'stockade-entrypoint: %s\n' "$*" >&2; }

rename_interface() {
    local name="${1%%=*}" subnet="${1#*=}" dev
    [ "$name" != "$1" ] && [ -n "$subnet" ] || { log "bad --ifname '$1' (want NAME=SUBNET)"; exit 2; }
    dev="$(ip -o -4 route show proto kernel scope link | awk -v net="$subnet" '$1 == net {print $3; exit}')"
    [ -n "$dev" ] || { log "--ifname $1: no interface is on $subnet"; ip -o -4 addr show >&2; exit 2; }
    if [ "$dev" = "$name" ]; then
        return
    fi
    # A link must be down to be renamed; its addresses stay, its connected
    # route comes back with it.
    ip link set dev "$dev" down
    ip link set dev "$dev" name "$name"
    ip link set dev "$name" up
    log "interface $dev ($subnet) renamed $name"
}

add_route() {
    local dest="${1%%=*}" gateways="${1#*=}" gw
    local -a hops=() gws=()
    [ "$dest" != "$1" ] && [ -n "$gateways" ] || { log "bad --route '$1' (want DEST=GW[,GW...])"; exit 2; }
    IFS=, read -r -a gws <<<"$gateways"
    if [ "${#gws[@]}" -eq 1 ]; then
        ip route replace "$dest" via "${gws[0]}"
        log "route $dest via ${gws[0]}"
        return
    fi
    for gw in "${gws[@]}"; do
        hops+=(nexthop via "$gw")
    done
    ip route replace "$dest" "${hops[@]}"
    log "route $dest via ${gws[*]} (ECMP)"
}

set_rto_min() {
    local name="${1%%=*}" rto="${1#*=}" route
    [ "$name" != "$1" ] && [ -n "$rto" ] || { log "bad --rto-min '$1' (want NAME=TIME)"; exit 2; }
    route="$(ip -o -4 route show dev "$name" proto kernel scope link | head -n 1)"
    [ -n "$route" ] || { log "--rto-min $1: no connected route on $name"; exit 2; }
    # shellcheck disable=SC2086  # the route's words are separate arguments
    # (`ip route show ... proto kernel scope link` leaves those keys out of
    # what it prints: give them again, or the route would change kind.)
    ip route replace $route dev "$name" proto kernel scope link rto_min "$rto"
    log "route ${route%% *} dev $name rto_min $rto"
}

# Docker's default route points at the bridge's host side, which has no
# address in this lab (docker-compose.yml): drop it, only the lab's own
# routes remain, so nothing can leave the lab by mistake.
ip route del default 2>/dev/null || true

while [ $# -gt 0 ]; do
    case "$1" in
        --ifname) [ $# -ge 2 ] || { log "--ifname needs a value"; exit 2; }; rename_interface "$2"; shift 2 ;;
        --route) [ $# -ge 2 ] || { log "--route needs a value"; exit 2; }; add_route "$2"; shift 2 ;;
        --rto-min) [ $# -ge 2 ] || { log "--rto-min needs a value"; exit 2; }; set_rto_min "$2"; shift 2 ;;
        --) shift; break ;;
        *) log "unknown argument '$1'"; exit 2 ;;
    esac
done

if [ $# -eq 0 ]; then
    log "idle"
    exec sleep infinity
fi
log "exec $*"
exec "$@"
