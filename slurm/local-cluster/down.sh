#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by up.sh: exactly the PIDs it recorded in $SLURM_LOCAL_PIDDIR,
# in the order slurmd, slurmctld, slurmdbd, mariadbd, munged. SIGTERM, up to 30 s to exit, then SIGKILL.
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
    if running "$1" "$p"; then
        kill -TERM "$p" 2>/dev/null || true
        for ((i = 0; i < 120; i++)); do running "$1" "$p" || break; sleep 0.25; done
        if running "$1" "$p"; then
            say "$1 (pid $p) still alive 30 s after SIGTERM: SIGKILL"
            kill -KILL "$p" 2>/dev/null || true
        fi
        say "$1 stopped (pid $p)"
    else
        say "$1 (pid $p) was not running"    # stale record; the PID may belong to something else now
    fi
    rm -f "$f"
}

if ! ls "$PIDDIR"/*.pid >/dev/null 2>&1; then
    say "nothing recorded in $PIDDIR: nothing to stop"
    exit 0
fi
for d in slurmd slurmctld slurmdbd mariadbd munged; do stop "$d"; done
rm -f "$PIDDIR"/*.pid    # records of names we do not know (none expected)
say "slurm local cluster down ($((SECONDS - T0)) s)"
