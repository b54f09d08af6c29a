#!/usr/bin/env bash
# The test suite: installs what is missing into .venv (first run only), then runs pytest on tests/ in three tiers and
# prints each tier's time: fast (`-m "not slow"`, the one-minute loop), integration (launchers, several processes,
# faults) and cluster (real hosts in network namespaces; they skip, saying why, where the machine cannot host them).
# The fast and integration tiers run on two pytest-xdist workers, a test file at a time per worker (its module fixtures
# built once): the time goes to single-threaded imports, process start-ups and bounded waits. The integration tests
# marked `alone` (a timing window, a race a neighbour's load can lose) run after, by themselves.
# Extra arguments run one pytest over tests/ with them instead, e.g. `bash tests/run.sh -k packing -x`.
# As root, the Debian packages of the cluster tier are installed first where missing (scripts/cluster_packages.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/cluster_packages.sh"
bash "$root/scripts/bootstrap.sh"
cd "$root"
py=("$root/.venv/bin/python" -m pytest tests)
[ $# -gt 0 ] && exec "${py[@]}" "$@"

log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
status=0 passed=0 failed=0 skipped=0 summary=()
declare -A took=()
tier() {  # tier NAME MARKER-EXPRESSION [PYTEST-ARGS...]: one pytest run; a tier with no test (exit 5) is not a failure
  local name=$1 expr=$2 start rc=0 last n
  shift 2
  start=$(date +%s)
  "${py[@]}" -m "$expr" "$@" 2>&1 | tee "$log/$name" || rc=${PIPESTATUS[0]}
  [ "$rc" -eq 5 ] && rc=0
  [ "$rc" -eq 0 ] || status=1
  last=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$log/$name" | tail -n 1 || true)
  for kind in passed failed skipped; do
    n=$(grep -oE "[0-9]+ $kind" <<<"$last" | grep -oE '^[0-9]+' || echo 0)
    declare -g "$kind=$(( ${!kind} + n ))"
  done
  n=$(grep -oE '[0-9]+ errors?' <<<"$last" | grep -oE '^[0-9]+' || echo 0)
  failed=$(( failed + n ))
  took[$name]=$(( $(date +%s) - start ))
  summary+=("$name ${took[$name]} s")
}
workers=(-n 2 --dist loadfile)
if ! "$root/.venv/bin/python" -c "import xdist" 2>/dev/null; then  # a .venv made before the dev extra listed it
  echo "tests/run.sh: pytest-xdist is not installed (.venv/bin/pip install -e '.[dev]'): the tiers run in one process"
  workers=()
fi
tier fast "not slow and not cluster" "${workers[@]}"
tier integration "slow and not cluster and not alone" "${workers[@]}"
tier integration-alone "slow and not cluster and alone"
tier cluster "cluster"
printf -v times "%s; " "${summary[@]}"
echo "tests/run.sh: ${times%; }; fast + integration $(( took[fast] + took[integration] + took[integration-alone] )) s" \
  "(targets: fast < 60 s, fast + integration < 720 s on the 2-core CI machine)"
echo "$passed passed, $failed failed, $skipped skipped"
exit "$status"
