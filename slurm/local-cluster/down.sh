#!/usr/bin/env bash
# Stop the SLURM cluster started by up.sh: exactly the PIDs it recorded in $SLURM_LOCAL_PIDDIR, in the order
# the slurmds (the host's and the namespace nodes'), slurmctld, slurmdbd, mariadbd, munged: SIGTERM, up to 30 s
# to exit, then SIGKILL; then the namespaces and links recorded in $SLURM_LOCAL_PIDDIR/network, by name.
# Never pkill/killall. Safe when nothing is up (exit 0). Jobs still running are killed with slurmd; the
# controller state and the accounting DB persist, so the next up.sh continues the job-id numbering.
set -euo pipefail

# shellcheck source=slurm/local-cluster/common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
T0=$SECONDS

stop() {
    local f="$PIDDIR/$1.pid" p i
    [[ -s $f ]] || return 0
    p=$(<"$f")
    if running "${1%%-*}" "$p"; then    # slurmd-<node>: a slurmd
        kill -TERM "$p" 2>/dev/null || true
        for ((i = 0; i < 120; i++)); do running "${1%%-*}" "$p" || break; sleep 0.25; done
        if running "${1%%-*}" "$p"; then
            say "$1 (pid $p) still alive 30 s after SIGTERM: SIGKILL"
            kill -KILL "$p" 2>/dev/null || true
        fi
        say "$1 stopped (pid $p)"
    else
        say "$1 (pid $p) was not running"    # stale record; the PID may belong to something else now
    fi
    rm -f "$f"
}

# remove_network: what up.sh --nodes recorded, newest first; a name already gone is skipped.
remove_network() {
    local f="$PIDDIR/network" kind name
    [[ -s $f ]] || { rm -f "$f"; return 0; }
    tac "$f" | while read -r kind name; do
        case $kind in
            netns) ip netns del "$name" 2>/dev/null && say "namespace $name removed" || true ;;
            link) ip link del "$name" 2>/dev/null && say "link $name removed" || true ;;
            hosts)    # in place (sed -i would replace the file, which a container may have bind-mounted)
                local kept
                kept=$(sed '/^# slurm-local up.sh --nodes: begin$/,/^# slurm-local up.sh --nodes: end$/d' "$name")
                printf '%s\n' "$kept" >"$name"
                say "node names removed from $name" ;;
        esac
    done
    rm -f "$f"
}

if ! recorded; then
    say "nothing recorded in $PIDDIR: nothing to stop"
    exit 0
fi
for f in "$PIDDIR"/slurmd*.pid; do [[ -e $f ]] && stop "$(basename "$f" .pid)"; done
for d in slurmctld slurmdbd mariadbd munged; do stop "$d"; done
rm -f "$PIDDIR"/*.pid    # records of names we do not know (none expected)
remove_network
say "slurm local cluster down ($((SECONDS - T0)) s)"
