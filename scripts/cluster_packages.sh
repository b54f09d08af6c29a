#!/usr/bin/env bash
# The Debian packages of the cluster test tier (tests/cluster.py: sshd, pdsh and ip for the hosts; Slurm, munge and
# OpenMPI for their backends), installed where missing: as root with apt-get only, quietly, and nothing at all when
# every one is there. Elsewhere it does nothing, and the cluster tests skip with one line saying why.
set -euo pipefail
packages=(openssh-server openssh-client pdsh iproute2 util-linux slurmd slurmctld slurm-client munge openmpi-bin)
[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || exit 0
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
[ "${#missing[@]}" -gt 0 ] || exit 0
echo "cluster_packages.sh: installing ${missing[*]} for the cluster tests (apt-get)" >&2
log=$(mktemp -t ds-mlm-apt.XXXXXX)
if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}"; } >"$log" 2>&1; then
  rm -f "$log"
else
  echo "cluster_packages.sh: warning: apt-get failed (its output: $log); the cluster tests will skip" >&2
fi
