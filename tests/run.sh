#!/usr/bin/env bash
# The test suite: installs what is missing into .venv (first run only), then runs pytest on tests/.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k packing -x`.
# As root, the Debian packages of the cluster tier are installed first where missing (scripts/cluster_packages.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/cluster_packages.sh"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest tests "$@"
