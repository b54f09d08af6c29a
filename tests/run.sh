#!/usr/bin/env bash
# The test suite: installs what is missing into .venv (first run only), then runs pytest on tests/.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k packing -x`.
# As root, the Debian packages of the cluster tier (tests/cluster.py: sshd, pdsh, Slurm, munge, OpenMPI) are
# installed first where missing (apt-get, quiet; nothing is done when all are there). Without root or apt-get the
# cluster tests skip with one line saying why.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cluster_packages=(openssh-server openssh-client pdsh iproute2 util-linux slurmd slurmctld slurm-client munge openmpi-bin)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for pkg in "${cluster_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "tests/run.sh: installing ${missing[*]} for the cluster tests (apt-get)" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"; } >/tmp/ds-mlm-apt.log 2>&1; then
      echo "tests/run.sh: warning: apt-get failed (see /tmp/ds-mlm-apt.log); the cluster tests will skip" >&2
    fi
  fi
fi
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest tests "$@"
