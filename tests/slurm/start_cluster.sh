#!/usr/bin/env bash
# Start a one-node SLURM cluster with accounting on this machine (Debian packages slurm-wlm, munge,
# slurmdbd, mariadb-server), for the workflow's SLURM tests. Idempotent; needs root.
#   install: apt-get install -y slurm-wlm munge slurmdbd mariadb-server
set -euo pipefail
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
ETC=/etc/slurm
mkdir -p "$ETC" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /run/slurm
chown slurm:slurm /var/spool/slurmctld /var/log/slurm /run/slurm 2>/dev/null || true

# munge: the shared key that authenticates every SLURM message
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged --force"

# mariadb + slurmdbd: accounting, which the Snakemake SLURM executor queries for job status
if ! pgrep -x mariadbd >/dev/null && ! pgrep -x mysqld >/dev/null; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  (mysqld_safe --user=mysql >/var/log/mysqld_safe.log 2>&1 &)
  for _ in $(seq 30); do mysqladmin ping >/dev/null 2>&1 && break; sleep 1; done
fi
mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

cat >"$ETC/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONF
chown slurm:slurm "$ETC/slurmdbd.conf"; chmod 600 "$ETC/slurmdbd.conf"

cat >"$ETC/slurm.conf" <<CONF
ClusterName=kbit
SlurmctldHost=$HOST
AuthType=auth/munge
SlurmUser=slurm
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
rm -f "$ETC/cgroup.conf"  # no cgroups in containers/VMs: slurmd falls back without one

pgrep -x slurmdbd >/dev/null || /usr/sbin/slurmdbd
for _ in $(seq 30); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 1; done
sacctmgr -i add cluster kbit >/dev/null 2>&1 || true
sacctmgr -i add account kbit Cluster=kbit >/dev/null 2>&1 || true
sacctmgr -i add user root Account=kbit >/dev/null 2>&1 || true
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 30); do sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|alloc" && break; sleep 1; done
scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
sinfo
