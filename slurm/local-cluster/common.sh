# shellcheck shell=bash disable=SC2034
# Shared by up.sh and down.sh (sourced): where the daemons' PIDs are recorded, and how to tell they run.
PIDDIR=${SLURM_LOCAL_PIDDIR:-/run/slurm-local}

say() { echo "slurm-local: $*"; }

# running NAME PID: PID is a live (not zombie) process whose command is NAME. The comm check guards
# against a PID reused since it was recorded; the zombie check matters because PID 1 here reaps
# detached daemons late, so a daemon that exited can linger for seconds as <defunct>.
running() {
    local comm state
    [[ $2 =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$2/comm" 2>/dev/null) || return 1
    state=$(awk '{print $3}' "/proc/$2/stat" 2>/dev/null) || return 1
    [[ $comm == "$1" && $state != Z ]]
}

# recorded: up.sh recorded something here (a daemon's PID, or the network of --nodes).
recorded() { compgen -G "$PIDDIR/*.pid" >/dev/null || [[ -e $PIDDIR/network ]]; }
