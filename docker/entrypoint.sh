#!/usr/bin/env bash
# Entry point of every lab container (docker-compose.yml): set up this
# container's routing, then run its program.
#
#   stockade-entrypoint [--route DEST=GW[,GW...]]... [--masquerade DEST]...
#                       [--announce ADDR]... [-- CMD [ARG...]]
#
# --route        add a route; several gateways make an ECMP (multipath) route.
#                DEST "default" replaces the default route.
# --masquerade   source-NAT traffic towards DEST to this container's own
#                address on the way out (firewall nodes, see below).
# --announce     ping ADDR (a neighbour router) once at start, so it learns
#                this container's address again (see below).
# CMD            the program to run (exec'd, so it gets the signals); without
#                one the container idles until stopped.
#
# Why each piece exists:
# - The lab routes through its routers and firewall nodes, not through
#   Docker's bridge, so routes are set here (containers have NET_ADMIN).
# - Multipath routes: the kernel keeps sending a flow to a dead next hop
#   unless it knows the neighbour failed.  With
#   net.ipv4.fib_multipath_use_neigh=1 (set in docker-compose.yml) it skips a
#   next hop whose ARP entry is FAILED; the neighbour timers of the
#   next hops' interface are shortened here so a dead node is FAILED within
#   about two seconds instead of half a minute.  /proc/sys is read-only in a
#   container, `ip ntable` (netlink) is not.
# - Announce: a router keeps a FAILED neighbour entry for a node that died
#   (the kernel garbage-collects only when the table is large), so a
#   restarted node would never be chosen again.  One packet from the node
#   makes the router's kernel see its ARP request and mark the entry usable.
# - Masquerade: until the sync daemon shares flow state, a node drops the
#   reply of a flow it did not see open.  Source-NAT on each node makes the
#   server answer the node that forwarded the request, so both directions of
#   a flow cross the same node (docs/compose-lab.md).
set -euo pipefail

log() { printf 'stockade-entrypoint: %s\n' "$*" >&2; }

# Neighbour timers (milliseconds) for interfaces that carry multipath routes.
NEIGH_REACHABLE_MS=1000
NEIGH_DELAY_PROBE_MS=300
NEIGH_RETRANS_MS=300
NEIGH_UCAST_PROBES=3

add_route() {
    local dest="${1%%=*}" gateways="${1#*=}" gw dev
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
        dev="$(ip -o route get "$gw" | sed -n 's/.* dev \([^ ]*\).*/\1/p')"
        ip ntable change name arp_cache dev "$dev" \
            base_reachable "$NEIGH_REACHABLE_MS" delay_probe "$NEIGH_DELAY_PROBE_MS" \
            retrans "$NEIGH_RETRANS_MS" ucast_probes "$NEIGH_UCAST_PROBES"
    done
    ip route replace "$dest" "${hops[@]}"
    log "route $dest via ${gws[*]} (ECMP)"
}

announce() {
    # Not an error when it fails: at the lab's first start the router may
    # not be up yet, and it will learn the address from the first flow.
    if ping -c 1 -W 1 "$1" >/dev/null 2>&1; then
        log "announced to $1"
    else
        log "announce: $1 did not answer"
    fi
}

masquerade() {
    iptables -w -t nat -A POSTROUTING -d "$1" -j MASQUERADE
    log "masquerade towards $1"
}

# Docker's default route points at the bridge's host side, which has no
# address in this lab (docker-compose.yml): drop it, only the lab's own
# routes remain, so nothing can leave the lab by mistake.
ip route del default 2>/dev/null || true

while [ $# -gt 0 ]; do
    case "$1" in
        --route) add_route "$2"; shift 2 ;;
        --masquerade) masquerade "$2"; shift 2 ;;
        --announce) announce "$2"; shift 2 ;;
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
