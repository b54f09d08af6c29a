#!/usr/bin/env bash
# The test suite: installs what is missing into .venv (first run only), then runs pytest on tests/.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k packing -x`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest tests "$@"
