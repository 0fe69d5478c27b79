#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine (Debian 12 packages, run as root, no systemd).
#
#   bash slurm/local-cluster/up.sh            # install if needed, write configs, start the daemons, wait until usable
#   bash slurm/local-cluster/up.sh --nodes 2  # ... plus 2 nodes, each a slurmd in its own network and UTS namespace
#   bash slurm/local-cluster/down.sh          # stop exactly the daemons, namespaces and links this script made
#
# Daemons: munged, mariadbd, slurmdbd, slurmctld, slurmd. Each one daemonizes itself; its PID is recorded in
# $SLURM_LOCAL_PIDDIR/<name>.pid and down.sh stops exactly those PIDs.
# Idempotent: when every recorded daemon is alive, the generated configs are unchanged and the node answers,
# it says so and exits 0 at once. Otherwise it stops what it recorded and starts everything cleanly.
#
# Knobs (environment):
#   SLURM_LOCAL_USER=slurm        SlurmUser that slurmctld/slurmdbd drop to (root also works); slurmd is always root
#   SLURM_LOCAL_TIMEOUT=60        seconds to wait for the node to be usable and for sacct to answer
#   SLURM_LOCAL_PIDDIR=/run/slurm-local
#   SLURM_LOCAL_DB_PASS=...       password of the MariaDB user `slurm` (the DB only listens on 127.0.0.1)
#
# The cluster: ClusterName=localcluster, one node named `hostname -s` at 127.0.0.1, partition `debug`
# (default, preemptible by requeue) and partition `high` (preempts `debug`; only for preemption tests).
#
# --nodes N (2 to 8) adds nodes n1..nN, for multi-node jobs: each is a slurmd in its own network namespace
# (slurm-n<i>, a veth pair on the bridge slurm-br0) and UTS namespace (hostname n<i>), at $SUBNET.1<i>; the
# host is $SUBNET.1 on the bridge, and the controller and the host's node listen there, so every node reaches
# every other. They share this machine's filesystem, as a cluster's nodes share theirs. Partitions `multi`
# (n1..nN, preemptible) and `multihigh` (preempts `multi`). Traffic stays on the bridge and the loopback.
#   SLURM_LOCAL_SUBNET=10.77.0    the /24 of the bridge (refused if this machine already has an address in it)
set -euo pipefail

NODES=1
while (($#)); do
    case $1 in
        --nodes) NODES=${2:-}; shift; shift || true ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        *) echo "slurm-local: ERROR: unknown argument $1 (usage: up.sh [--nodes N])" >&2; exit 2 ;;
    esac
done
[[ $NODES =~ ^[1-8]$ ]] || { echo "slurm-local: ERROR: --nodes: expected 1 to 8, got '$NODES'" >&2; exit 2; }
SUBNET=${SLURM_LOCAL_SUBNET:-10.77.0}
EXTRA=()                                                # the namespace nodes: n1 .. nN
if ((NODES > 1)); then for ((i = 1; i <= NODES; i++)); do EXTRA+=("n$i"); done; fi
CTL_ADDR=127.0.0.1
((NODES == 1)) || CTL_ADDR=$SUBNET.1
for n in "${EXTRA[@]}"; do DAEMONS+=("slurmd-$n"); done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SUSER=${SLURM_LOCAL_USER:-slurm}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
DB_PASS=${SLURM_LOCAL_DB_PASS:-slurmlocal}
HOST=$(hostname -s)
DAEMONS=(munged mariadbd slurmdbd slurmctld "slurmd-$HOST")    # start order; down.sh stops in reverse
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
READY_STATES='idle|mixed|allocated|completing'         # node answers; a restarted cluster may run old jobs at once
T0=$SECONDS

# shellcheck source=slurm/local-cluster/common.sh source-path=SCRIPTDIR
source "$HERE/common.sh"
die() { echo "slurm-local: ERROR: $*" >&2; exit 1; }

# alive NAME: the PID recorded for NAME (slurmd-<node>: a slurmd) is running.
alive() { [[ -s $PIDDIR/$1.pid ]] && running "${1%%-*}" "$(<"$PIDDIR/$1.pid")"; }

# refuse_foreign NAME PIDFILE: fail if NAME runs from its own pid file without being recorded by us
# (we never kill what we did not start, and its port would make our copy fail anyway).
refuse_foreign() {
    [[ -s $2 ]] || return 0
    if running "$1" "$(<"$2")"; then
        die "$1 (pid $(<"$2"), from $2) is running but was not started by up.sh; stop it first"
    fi
    rm -f "$2"
}

# record NAME PIDFILE: wait (up to 10 s) for the pid file the daemon writes, then copy it to $PIDDIR.
record() {
    local i
    for ((i = 0; i < 100; i++)); do [[ -s $2 ]] && break; sleep 0.1; done
    [[ -s $2 ]] || die "$1 did not write $2 (see /var/log/slurm/)"
    cp "$2" "$PIDDIR/$1.pid"
    alive "$1" || die "$1 exited right after start (see /var/log/slurm/)"
    say "$1 started (pid $(<"$PIDDIR/$1.pid"))"
}

# wait_for SECONDS CMD...: poll CMD every 0.25 s; false if it never succeeded.
wait_for() {
    local n=$(($1 * 4)) i
    shift
    for ((i = 0; i < n; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
    return 1
}

node_ready() { sinfo -h -n "$1" -o %T 2>/dev/null | grep -Eqx "$READY_STATES"; }
all_ready() { local n; for n in "$HOST" "${EXTRA[@]}"; do node_ready "$n" || return 1; done; }
sacct_ready() { sacct -n -X -S now >/dev/null 2>&1; }

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        say "packages present"
        return
    fi
    say "installing ${missing[*]}"
    apt-get update -qq
    # Recommends would pull ~40 extra packages (-dev plugins, hdf5, rocm); none is needed.
    # Without systemd (policy-rc.d denies starts) the postinsts start nothing, which is what we want.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    say "packages installed ($((SECONDS - T0)) s)"
}

# render_slurm_conf: print slurm.conf for this machine. The topology comes from `slurmd -C`: giving only
# CPUs= makes slurmd complain about socket/core boundaries. RealMemory is 95% of the detected value,
# because a RealMemory above what slurmd detects drains the node ("Low RealMemory").
render_slurm_conf() {
    local c cpus sockets cores threads mem
    c=$(slurmd -C | head -n1)
    field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$c"; }
    cpus=$(field CPUs) sockets=$(field SocketsPerBoard)
    cores=$(field CoresPerSocket) threads=$(field ThreadsPerCore)
    mem=$(($(field RealMemory) * 95 / 100))
    [[ -n $cpus && -n $sockets && -n $cores && -n $threads && $mem -gt 0 ]] || die "cannot parse \`slurmd -C\`: $c"
    cat <<EOF
# Generated by slurm/local-cluster/up.sh; edits are overwritten at the next start.
ClusterName=localcluster
SlurmctldHost=${HOST}(${CTL_ADDR})
SlurmUser=${SUSER}
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
# cred_expire is also the delay before a requeued job may start again (default 120 s would make every
# checkpoint/preemption test wait 2 min). Applied only by a full daemon restart, not scontrol reconfigure.
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
# No cgroups: plain process tracking works in containers and on hybrid cgroup mounts alike.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
# submitit reads job states through sacct, so accounting is required (without it a cancelled job's
# result() never returns).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
# Schedule every second: the defaults leave a requeued job pending ~20 s after it became eligible, and a
# stage whose dependency ended waits for the next pass (up to 5 s each at sched_interval=5, the tests' chains).
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
# A job in \`high\` preempts (requeues) jobs in \`debug\`; preempt_send_user_signal delivers the job's
# --signal (submitit: USR2) at preemption, so submitit checkpoints before the requeue.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=${HOST} NodeAddr=${CTL_ADDR} CPUs=${cpus} Sockets=${sockets} CoresPerSocket=${cores} ThreadsPerCore=${threads} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=20
PartitionName=high Nodes=${HOST} Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
    ((${#EXTRA[@]})) || return 0
    local i list
    list=$(IFS=,; echo "${EXTRA[*]}")
    for ((i = 1; i <= ${#EXTRA[@]}; i++)); do
        # the host's CPUs again: the namespace nodes share its cores (oversubscribed, as test nodes may be)
        echo "NodeName=n$i NodeHostname=n$i NodeAddr=$SUBNET.1$i CPUs=${cpus} Sockets=${sockets} CoresPerSocket=${cores} ThreadsPerCore=${threads} RealMemory=${mem} State=UNKNOWN"
    done
    echo "PartitionName=multi Nodes=$list Default=NO MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=20"
    echo "PartitionName=multihigh Nodes=$list Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF"
}

render_slurmdbd_conf() {
    cat <<EOF
# Generated by slurm/local-cluster/up.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=${SUSER}
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=${DB_PASS}
EOF
}

start_munged() {
    refuse_foreign munged /run/munge/munged.pid
    if [[ ! -s /etc/munge/munge.key ]]; then    # normally created by the munge postinst
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 600 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged    # as the key's owner, so no --force is needed
    record munged /run/munge/munged.pid
    wait_for 10 bash -c 'munge -n | unmunge' || die "munge does not answer"
}

start_mariadbd() {
    refuse_foreign mariadbd /run/mysqld/mysqld.pid
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >/dev/null    # postinst normally did this
    # mariadbd does not daemonize itself: detach it (setsid, no inherited stdio) so callers piping our
    # output do not hang on it.
    setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
        --socket=/run/mysqld/mysqld.sock --bind-address=127.0.0.1 \
        >>/var/log/slurm/mariadbd.log 2>&1 </dev/null &
    wait_for 60 mysqladmin --socket=/run/mysqld/mysqld.sock ping \
        || die "mariadbd does not answer (see /var/log/slurm/mariadbd.log)"
    record mariadbd /run/mysqld/mysqld.pid
    # ALTER USER keeps the password in step with SLURM_LOCAL_DB_PASS when the user already exists.
    mysql --socket=/run/mysqld/mysqld.sock -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurm_daemon() {    # start_slurm_daemon NAME: slurmdbd / slurmctld daemonize themselves
    refuse_foreign "$1" "/run/slurm/$1.pid"
    "/usr/sbin/$1"
    record "$1" "/run/slurm/$1.pid"
}

# start_slurmd NODE: the host's slurmd, or node n<i>'s in its namespaces (its own address, its own hostname:
# what a job's tasks see as the node they run on).
start_slurmd() {
    local pidfile=/run/slurm/slurmd-$1.pid
    refuse_foreign slurmd "$pidfile"
    mkdir -p "/var/spool/slurmd/$1"
    if [[ $1 == "$HOST" ]]; then
        /usr/sbin/slurmd || die "slurmd did not start (see /var/log/slurm/slurmd-$1.log)"
    else
        # nsenter, not `ip netns exec`: that also remounts /sys, hiding /sys/fs/cgroup, and slurmd stops
        nsenter --net="/run/netns/slurm-$1" unshare --uts -- \
            sh -c 'hostname "$1" && exec /usr/sbin/slurmd -N "$1"' sh "$1" \
            || die "slurmd of node $1 did not start (see /var/log/slurm/slurmd-$1.log)"
    fi
    record "slurmd-$1" "$pidfile"
}

# make_network: the bridge slurm-br0 at $SUBNET.1 and, per node n<i>, the namespace slurm-n<i> holding eth0 at
# $SUBNET.1<i> (the other end of a veth pair on the bridge). Each name is recorded in $PIDDIR/network before it
# is made, so down.sh removes exactly these, even after a failure half-way.
make_network() {
    local i ns
    ! ip -4 -o addr show | grep -q " inet $SUBNET\." \
        || die "this machine already has an address in $SUBNET.0/24; choose another SLURM_LOCAL_SUBNET"
    echo "link slurm-br0" >>"$PIDDIR/network"
    ip link add slurm-br0 type bridge
    ip addr add "$SUBNET.1/24" dev slurm-br0
    ip link set slurm-br0 up
    for ((i = 1; i <= ${#EXTRA[@]}; i++)); do
        ns=slurm-n$i
        echo "netns $ns" >>"$PIDDIR/network"
        ip netns add "$ns"
        echo "link slurm-v$i" >>"$PIDDIR/network"
        ip link add "slurm-v$i" type veth peer name eth0 netns "$ns"
        ip link set "slurm-v$i" master slurm-br0 up
        ip -n "$ns" addr add "$SUBNET.1$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        ip -n "$ns" route add default via "$SUBNET.1"
    done
    # Node names resolve on a cluster (submitit's rendezvous is the first node's hostname): a marked block of
    # /etc/hosts, which down.sh removes by its markers.
    echo "hosts /etc/hosts" >>"$PIDDIR/network"
    {
        echo "# slurm-local up.sh --nodes: begin"
        for ((i = 1; i <= ${#EXTRA[@]}; i++)); do echo "$SUBNET.1$i n$i"; done
        echo "# slurm-local up.sh --nodes: end"
    } >>/etc/hosts
    say "network: bridge slurm-br0 $SUBNET.1, namespaces ${EXTRA[*]/#/slurm-} at $SUBNET.11-1${#EXTRA[@]}"
}

# ---------------------------------------------------------------------------------------------------------
[[ $(id -u) == 0 ]] || die "must run as root"
install_packages

NEW_CONF=$(render_slurm_conf)
NEW_DBD=$(render_slurmdbd_conf)
conf_same() { [[ -f $2 && $(<"$2") == "$1" ]]; }

why=()
for d in "${DAEMONS[@]}"; do alive "$d" || why+=("$d not running"); done
conf_same "$NEW_CONF" /etc/slurm/slurm.conf || why+=("slurm.conf changed")
conf_same "$NEW_DBD" /etc/slurm/slurmdbd.conf || why+=("slurmdbd.conf changed")
if ((${#why[@]} == 0)) && all_ready && sacct_ready; then
    say "already up: nodes $HOST ${EXTRA[*]} $(sinfo -h -n "$HOST" -o %T), recorded daemons alive, configs unchanged"
    exit 0
fi
((${#why[@]})) || why+=("node or sacct not answering")

# Anything recorded (alive or not) is stopped and forgotten: a clean start is simpler to reason about
# than a partial restart, and config changes such as cred_expire need a full restart anyway.
if recorded; then
    reason=$(printf '%s, ' "${why[@]}")
    say "restarting: ${reason%, }"
    bash "$HERE/down.sh"
fi

say "writing /etc/slurm/slurm.conf and slurmdbd.conf"
mkdir -p "$PIDDIR" /etc/slurm /var/spool/slurmd /var/spool/slurmctld /var/log/slurm /run/slurm
# recursive: after a switch of SLURM_LOCAL_USER, state files and logs written by the previous user would
# otherwise be unreadable ("Could not open job state file: Permission denied", jobs lost)
chown -R "$SUSER:$SUSER" /var/spool/slurmctld /var/log/slurm /run/slurm
chmod 755 /run/slurm
printf '%s\n' "$NEW_CONF" >/etc/slurm/slurm.conf
printf '%s\n' "$NEW_DBD" >/etc/slurm/slurmdbd.conf
chown "$SUSER:$SUSER" /etc/slurm/slurmdbd.conf    # slurmdbd refuses a config that is not 600 and its own
chmod 600 /etc/slurm/slurmdbd.conf

((${#EXTRA[@]} == 0)) || make_network
start_munged
start_mariadbd
start_slurm_daemon slurmdbd
wait_for 30 bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819' || die "slurmdbd does not listen on 6819 (see /var/log/slurm/slurmdbd.log)"
start_slurm_daemon slurmctld    # registers the cluster in slurmdbd by itself (no sacctmgr needed)
for n in "$HOST" "${EXTRA[@]}"; do start_slurmd "$n"; done

say "waiting for nodes $HOST ${EXTRA[*]} and sacct (up to $TIMEOUT s)"
deadline=$((SECONDS + TIMEOUT))
for n in "$HOST" "${EXTRA[@]}"; do
    until node_ready "$n"; do
        # a node left DOWN/DRAINED by an earlier run is put back into service
        case $(sinfo -h -n "$n" -o %T 2>/dev/null) in
            down* | drain* | fail*) scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        ((SECONDS < deadline)) || die "node $n not usable after $TIMEOUT s: $(sinfo -h -n "$n" -o '%T %E' 2>&1) (see /var/log/slurm/)"
        sleep 0.25
    done
done
until sacct_ready; do
    ((SECONDS < deadline)) || die "sacct does not answer after $TIMEOUT s: $(sacct -n -X -S now 2>&1 | head -n1)"
    sleep 0.25
done
say "slurm local cluster up: nodes $HOST ${EXTRA[*]} $(sinfo -h -n "$HOST" -o %T) ($((SECONDS - T0)) s)"
