#!/usr/bin/env bash
# launch.sh: start a ds-mlm pretraining job -- the bundled demo, one machine, or many nodes -- through the deepspeed
# launcher (or torchrun). Arguments go to ds_mlm/run_mlm.py unchanged (`bash launch.sh --help` lists its flags).
#
#   bash launch.sh          the demo (no PROJECT_TRAIN_DIR): train a SentencePiece tokenizer of
#                           PROJECT_DEMO_VOCAB_SIZE (4000) pieces on data/sample/train (once), pretrain
#                           --architecture roberta-tiny for 500 steps on this machine (bf16 where the CPU has it,
#                           else fp32: ds_configs/README.md), then fill a <mask> in a Thai and an English sentence.
#                           Everything goes to runs/demo/ (PROJECT_DEMO_DIR); the PROJECT_* variables below override
#                           its values. A second run resumes from the last checkpoint, finds the training done,
#                           exports and evaluates again; delete runs/demo/output to train afresh.
#   PROJECT_TRAIN_DIR=D PROJECT_TOKENIZER=T PROJECT_OUTPUT_DIR=O bash launch.sh [run_mlm.py flags]     your job
#
# Where the job runs:
#   (nothing set)                          this machine: one process per GPU, or one process on a CPU-only machine
#   N_GPUS_PER_NODE=2                      this machine, 2 processes
#   HOSTFILE=F                             every node listed in F (see hostfiles/), started from here over ssh by
#                                          pdsh; other backends through LAUNCHER_ARGS="--launcher slurm|openmpi|..."
#   N_NODES=4 NODE_RANK=r MASTER_ADDR=A    this node only, as node r of 4 (`--no_ssh`): run it on every node,
#                                          node 0 (the one at MASTER_ADDR) first; N_NODES can come from HOSTFILE
#   LAUNCHER=torchrun                      torchrun instead of the deepspeed launcher (one call per node, as above)
#   BUILD_DATASET_ONLY=1, or --build_dataset_only as the first argument:
#                                          build the token stores on this node as one process, and stop
#
# Variables (a run_mlm.py flag is passed only when its variable is set, so a DS_CONFIG file keeps its own values):
#   PROJECT_TRAIN_DIR       --train_dir                  directory of *.txt training files (set = not the demo)
#   PROJECT_EVAL_DIR        --eval_dir                   directory of *.txt evaluation files
#   PROJECT_TOKENIZER       --tokenizer_name_or_path     tokenizer directory (required with PROJECT_TRAIN_DIR)
#   PROJECT_TOKENIZER_TYPE  --tokenizer_type             auto, spm, newmm, syllable, sefr_cut
#   PROJECT_OUTPUT_DIR      --output_dir                 checkpoints, logs, the model (required with PROJECT_TRAIN_DIR)
#   PROJECT_CACHE_DIR       --datasets_cache_dir         token stores (default OUTPUT_DIR/datasets_cache)
#   PROJECT_CACHE_SCOPE     --cache_scope                shared (one build per job), local (one per node), auto
#   PROJECT_ARCHITECTURE    --architecture               roberta-tiny, roberta-base, roberta-large
#   PROJECT_MAX_STEPS       --max_steps
#   PROJECT_MAX_SEQ_LENGTH  --max_seq_length
#   PROJECT_BATCH_SIZE      --per_device_train_batch_size
#   PROJECT_GRAD_ACC        --gradient_accumulation_steps
#   PROJECT_LEARNING_RATE   --learning_rate
#   PROJECT_WARMUP_STEPS    --warmup_steps
#   PROJECT_SAVE_STEPS      --save_steps
#   PROJECT_LOGGING_STEPS   --logging_steps
#   DS_CONFIG               --deepspeed_config           a DeepSpeed JSON (a bare name is looked up in ds_configs/)
#   N_NODES (1), N_GPUS_PER_NODE (GPUs, or 1 without), NODE_RANK, MASTER_ADDR (127.0.0.1 on one node),
#   MASTER_PORT (29500), HOSTFILE, LAUNCHER (deepspeed), LAUNCHER_ARGS (extra launcher flags, split on spaces),
#   STOP_GRACE_SECONDS (30): how long a stopped job's ranks may take to finish before what is left is killed.
#   SSH_ALIVE_SECONDS (15): from the master (HOSTFILE), pdsh's ssh to each node asks every N seconds whether the node
#                           still answers, and gives up after 4 unanswered asks: a dead or cut-off node's session
#                           ends, and so does the launcher, instead of waiting on it for hours (TCP keepalive).
#   MAX_RESTARTS (0): from the master (HOSTFILE, pdsh), after a job that failed (a lost node: not a flag error, not a
#                     stop), check every node over ssh (SSH_CHECK_SECONDS, 10), leave out those that do not answer
#                     (the new hostfile is OUTPUT_DIR/launch/hostfile, the old one hostfile.before-restart-K), and
#                     start the same command again: it resumes from the newest complete checkpoint on the nodes
#                     left, up to N times. Pair it with run_mlm.py's --distributed_timeout_minutes (default 10): the
#                     ranks that lose a peer give up within it, naming the peer.
#
# Each process gets OMP_NUM_THREADS = cores / processes per node unless it is set, and DS_ACCELERATOR=cpu on a
# machine without an NVIDIA GPU. From the master, these reach the other nodes through OUTPUT_DIR/launch/deepspeed_env,
# which the launcher reads (DS_ENV_FILE) and which ends with the lines of your own ~/.deepspeed_env and
# ./.deepspeed_env, so yours win. Every command is printed before it runs. A missing variable or a malformed hostfile
# stops with one line `launch.sh: error: ...` and exit status 2.
#
# Stopping: SIGTERM, SIGINT (Ctrl-C), SIGHUP or SIGUSR1 to launch.sh goes to every rank of the job on this node (each
# command runs under ds_mlm/supervise.py, which passes the signal on), the ranks' own handling applies, and after
# STOP_GRACE_SECONDS whatever is left is killed; no further command starts, and the exit status is never 0 (75 when
# the ranks saved a checkpoint). A launcher that is signalled or killed itself (the deepspeed runner, torchrun,
# deepspeed.launcher.launch, the supervisor) cannot leave its ranks running either: each rank watches its chain of
# launchers and stops with a checkpoint when it changes. From the master (HOSTFILE), the deepspeed runner's pdsh mode
# sends the other nodes' launchers SIGTERM (pkill); if the runner is killed, the supervisor ends pdsh and its ssh
# sessions, and the remote ranks see theirs close. README, "Stop signals", has what each process does, measured.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=$root/.venv/bin/python
run_mlm=$root/ds_mlm/run_mlm.py

die() {
  echo "launch.sh: error: $*" >&2
  exit 2
}

show() {
  printf 'launch.sh: running:'
  printf ' %q' "$@"
  printf '\n'
}

# Each command runs in the background under the supervisor, so that our traps run while it does (bash defers a trap
# until a foreground command ends). A signal is passed to the supervisor, which passes it to the ranks; launch.sh
# waits for it to end, then exits: the next command never starts.
stop_signal=''
interrupted=''
current=''
# shellcheck disable=SC2329  # called by the traps below
stop() {
  stop_signal=$1
  interrupted=1
  if [ -n "$current" ]; then kill -s "$1" "$current" 2>/dev/null || true; fi
}
for sig in TERM INT HUP USR1; do
  # shellcheck disable=SC2064  # expanded now, on purpose: each trap names its own signal
  trap "stop $sig" "$sig"
done

exit_if_stopped() {  # [STATUS]: after a stop, exit with STATUS (or 128 + the signal where STATUS is 0 or absent)
  [ -n "$stop_signal" ] || return 0
  local status=${1:-0}
  [ "$status" != 0 ] || status=$((128 + $(kill -l "$stop_signal")))
  echo "launch.sh: stopped by SIG$stop_signal (exit status $status)" >&2
  exit "$status"
}

run() {  # [--ranks-of MODULE] COMMAND...: print COMMAND, run it under the supervisor, return its exit status
  local supervise=("$python" -m ds_mlm.supervise --grace "$grace") status=0 again
  if [ "$1" = --ranks-of ]; then
    supervise+=(--ranks-of "$2")
    shift 2
  fi
  show "$@"
  exit_if_stopped
  # A background command ignores SIGINT unless told otherwise (`trap -`), so Ctrl-C would not reach it
  (trap - INT QUIT && exec "${supervise[@]}" -- "$@") </dev/null &
  current=$!
  if [ -n "$stop_signal" ]; then kill -s "$stop_signal" "$current" 2>/dev/null || true; fi  # came before $!
  wait "$current" || status=$?
  while [ -n "$interrupted" ]; do  # a trap ran: the wait may have been cut short, wait again for the real status
    interrupted=''
    again=0
    wait "$current" 2>/dev/null || again=$?
    [ "$again" = 127 ] || status=$again  # 127: it had ended before the trap, $status is its status
  done
  current=''
  exit_if_stopped "$status"
  return "$status"
}

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

if [[ ${1:-} =~ ^(-h|--help)$ ]]; then  # this header, then run_mlm.py's flags
  sed -n '2,/^set -euo pipefail/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
  bash "$root/scripts/bootstrap.sh"
  exec "$python" -m ds_mlm.run_mlm --help
fi

# -- what to run ---------------------------------------------------------------------------------------------------

build_only=${BUILD_DATASET_ONLY:-0}
if [ "${1:-}" = --build_dataset_only ]; then
  build_only=1
  shift
fi

# The job's own flags on the command line (the ancestor's `bash launch.sh --train_dir D --output_dir O ...`) make it
# the user's job, not the demo: launch.sh reads the directories it needs from them where PROJECT_* is unset.
flag_value() {  # flag_value FLAG ARGS...: the first value given to FLAG (`FLAG V` or `FLAG=V`) in ARGS, or nothing
  local want=$1
  shift
  while [ $# -gt 0 ]; do
    case $1 in
      "$want") printf '%s' "${2:-}"; return ;;
      "$want"=*) printf '%s' "${1#*=}"; return ;;
    esac
    shift
  done
}
for pair in PROJECT_TRAIN_DIR:--train_dir PROJECT_TOKENIZER:--tokenizer_name_or_path \
            PROJECT_OUTPUT_DIR:--output_dir PROJECT_CACHE_DIR:--datasets_cache_dir; do
  var=${pair%%:*}
  [ -n "${!var:-}" ] || printf -v "$var" '%s' "$(flag_value "${pair#*:}" "$@")"
done

demo=0
if [ -z "${PROJECT_TRAIN_DIR:-}" ]; then
  demo=1
  demo_dir=${PROJECT_DEMO_DIR:-$root/runs/demo}
  PROJECT_TRAIN_DIR=$root/data/sample/train
  : "${PROJECT_EVAL_DIR:=$root/data/sample/eval}"
  : "${PROJECT_TOKENIZER:=$demo_dir/tokenizer}"
  : "${PROJECT_TOKENIZER_TYPE:=spm}"
  : "${PROJECT_OUTPUT_DIR:=$demo_dir/output}"
  : "${PROJECT_CACHE_DIR:=$demo_dir/cache}"
  : "${PROJECT_ARCHITECTURE:=roberta-tiny}"
  : "${PROJECT_MAX_STEPS:=500}"
  : "${PROJECT_MAX_SEQ_LENGTH:=128}"
  : "${PROJECT_BATCH_SIZE:=16}"
  : "${PROJECT_LEARNING_RATE:=1e-3}"
  : "${PROJECT_WARMUP_STEPS:=50}"
  : "${PROJECT_SAVE_STEPS:=250}"
  : "${PROJECT_LOGGING_STEPS:=50}"
fi
[ -n "${PROJECT_TOKENIZER:-}" ] || die "PROJECT_TOKENIZER is not set: export PROJECT_TOKENIZER=DIR (or pass --tokenizer_name_or_path DIR), the tokenizer directory (python -m ds_mlm.train_tokenizer makes one)"
[ -n "${PROJECT_OUTPUT_DIR:-}" ] || die "PROJECT_OUTPUT_DIR is not set: export PROJECT_OUTPUT_DIR=DIR (or pass --output_dir DIR), where checkpoints and the final model go"
[ -d "$PROJECT_TRAIN_DIR" ] || die "PROJECT_TRAIN_DIR=$PROJECT_TRAIN_DIR is not a directory: give the directory of the training *.txt files"

flags=(
  PROJECT_TRAIN_DIR:--train_dir PROJECT_EVAL_DIR:--eval_dir PROJECT_TOKENIZER:--tokenizer_name_or_path
  PROJECT_TOKENIZER_TYPE:--tokenizer_type PROJECT_OUTPUT_DIR:--output_dir PROJECT_CACHE_DIR:--datasets_cache_dir
  PROJECT_CACHE_SCOPE:--cache_scope PROJECT_ARCHITECTURE:--architecture PROJECT_MAX_STEPS:--max_steps
  PROJECT_MAX_SEQ_LENGTH:--max_seq_length PROJECT_BATCH_SIZE:--per_device_train_batch_size
  PROJECT_GRAD_ACC:--gradient_accumulation_steps PROJECT_LEARNING_RATE:--learning_rate
  PROJECT_WARMUP_STEPS:--warmup_steps PROJECT_SAVE_STEPS:--save_steps PROJECT_LOGGING_STEPS:--logging_steps
  DS_CONFIG:--deepspeed_config
)
args=()
for pair in "${flags[@]}"; do
  var=${pair%%:*}
  if [ -n "${!var:-}" ]; then
    args+=("${pair#*:}" "${!var}")
  fi
done
args+=("$@")  # after ours: argparse keeps the last value, so the command line wins

# -- where it runs -------------------------------------------------------------------------------------------------

hosts=()
slots=()
read_hostfile() {  # fills hosts/slots, stricter than DeepSpeed's parser (which reads `slots=4x` as 4)
  local file=$1 raw line n=0 host count
  [ -f "$file" ] || die "HOSTFILE=$file: no such file; give a hostfile (see hostfiles/)"
  while IFS= read -r raw || [ -n "$raw" ]; do
    n=$((n + 1))
    line=${raw%%#*}
    [[ $line =~ ^[[:space:]]*$ ]] && continue
    [[ $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([^[:space:]]*)[[:space:]]*$ ]] \
      || die "HOSTFILE=$file line $n: \"$raw\" is not \"HOST slots=N\": one node per line, N = its processes (GPUs)"
    host=${BASH_REMATCH[1]}
    count=${BASH_REMATCH[2]}
    is_count "$count" || die "HOSTFILE=$file line $n: slots=$count is not a number of processes: write e.g. \"$host slots=4\""
    for seen in "${hosts[@]+"${hosts[@]}"}"; do
      [ "$seen" != "$host" ] || die "HOSTFILE=$file line $n: $host is listed twice: give each node one line"
    done
    hosts+=("$host")
    slots+=("$count")
  done <"$file"
  [ "${#hosts[@]}" -gt 0 ] || die "HOSTFILE=$file lists no node: add lines \"HOST slots=N\""
}

launcher=${LAUNCHER:-deepspeed}
[[ $launcher =~ ^(deepspeed|torchrun)$ ]] || die "LAUNCHER=$launcher: use deepspeed or torchrun"
gpus=0
if [ "${DS_ACCELERATOR:-}" != cpu ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | wc -l)
fi
if [ "$gpus" = 0 ] && [ -z "${DS_ACCELERATOR:-}" ]; then
  export DS_ACCELERATOR=cpu  # say it, rather than let DeepSpeed guess (and warn) in every process
fi

if [ -n "${HOSTFILE:-}" ]; then
  read_hostfile "$HOSTFILE"
  nodes=${#hosts[@]}
  if [ -n "${N_NODES:-}" ] && [ "$N_NODES" != "$nodes" ]; then
    die "N_NODES=$N_NODES but HOSTFILE=$HOSTFILE lists $nodes nodes: unset N_NODES or fix the hostfile"
  fi
else
  nodes=${N_NODES:-1}
  per_node=${N_GPUS_PER_NODE:-$((gpus > 0 ? gpus : 1))}
  is_count "$nodes" || die "N_NODES=$nodes is not a number of nodes: give e.g. N_NODES=4"
  is_count "$per_node" || die "N_GPUS_PER_NODE=$per_node is not a number of processes: give e.g. N_GPUS_PER_NODE=4"
  if [ "$nodes" -eq 1 ]; then hosts=(localhost); else
    for ((i = 0; i < nodes; i++)); do hosts+=("node-$i"); done  # labels: with --no_ssh nothing is resolved
  fi
  for ((i = 0; i < nodes; i++)); do slots+=("$per_node"); done
fi

if [ -n "${NODE_RANK:-}" ] || [ "$nodes" -eq 1 ]; then
  mode=per-node
  node_rank=${NODE_RANK:-0}
  [[ $node_rank =~ ^[0-9]+$ ]] && [ "$node_rank" -lt "$nodes" ] \
    || die "NODE_RANK=$node_rank is not a node of this $nodes-node job (N_NODES or HOSTFILE): give 0 to $((nodes - 1)), 0 on the MASTER_ADDR node"
  if [ "$nodes" -gt 1 ]; then
    [ -n "${MASTER_ADDR:-}" ] || die "MASTER_ADDR is not set: export MASTER_ADDR=the address of node 0, the same on every node"
  fi
  master_addr=${MASTER_ADDR:-127.0.0.1}
else
  mode=from-master
  [ -n "${HOSTFILE:-}" ] || die "N_NODES=$nodes needs HOSTFILE (to start every node from here over ssh) or NODE_RANK (to start this node only)"
  [ "$launcher" = deepspeed ] || die "LAUNCHER=torchrun starts one node at a time: set NODE_RANK (and MASTER_ADDR) on each node"
  node_rank=0
  master_addr=${MASTER_ADDR:-}
fi
[ "$demo" = 0 ] || [ "$nodes" -eq 1 ] || die "the demo runs on one machine: set PROJECT_TRAIN_DIR and friends for a multi-node job"
master_port=${MASTER_PORT:-29500}
is_count "$master_port" || die "MASTER_PORT=$master_port is not a port number"
grace=${STOP_GRACE_SECONDS:-30}
[[ $grace =~ ^[0-9]+$ ]] || die "STOP_GRACE_SECONDS=$grace is not a number of seconds: give e.g. STOP_GRACE_SECONDS=60"
read -r -a launcher_args <<<"${LAUNCHER_ARGS:-}"
backend=pdsh  # how the deepspeed runner reaches the other nodes from the master (its --launcher)
for ((i = 0; i < ${#launcher_args[@]}; i++)); do
  case ${launcher_args[i]} in
    --launcher=*) backend=${launcher_args[i]#--launcher=} ;;
    --launcher) backend=${launcher_args[i + 1]:-} ;;
  esac
done
case $backend in
  pdsh | slurm | openmpi) ;;
  mpich | impi | mvapich) echo "launch.sh: warning: --launcher $backend has never been run with ds-mlm (tested: pdsh, slurm, openmpi)" >&2 ;;
  *) die "LAUNCHER_ARGS: --launcher $backend is not a deepspeed launcher backend: give pdsh (default), slurm or openmpi" ;;
esac
max_restarts=${MAX_RESTARTS:-0}
[[ $max_restarts =~ ^[0-9]+$ ]] || die "MAX_RESTARTS=$max_restarts is not a number of restarts: give e.g. MAX_RESTARTS=2"
ssh_alive=${SSH_ALIVE_SECONDS:-15}
is_count "$ssh_alive" || die "SSH_ALIVE_SECONDS=$ssh_alive is not a number of seconds: give e.g. SSH_ALIVE_SECONDS=15"
ssh_check=${SSH_CHECK_SECONDS:-10}
is_count "$ssh_check" || die "SSH_CHECK_SECONDS=$ssh_check is not a number of seconds: give e.g. SSH_CHECK_SECONDS=10"

if [ -z "${OMP_NUM_THREADS:-}" ]; then  # the processes of a node share its cores (torchrun would say 1)
  per_rank=$(($(nproc) / slots[node_rank]))
  export OMP_NUM_THREADS=$((per_rank > 0 ? per_rank : 1))
fi

# -- go ------------------------------------------------------------------------------------------------------------

# The rest is one block, read whole before it runs: bash reads a script as it goes, and launch.sh now outlives its
# job, so a file changed meanwhile (a git pull during a week-long run) would otherwise run garbage after the job.
{
bash "$root/scripts/bootstrap.sh"  # installs what is missing; returns at once when done
exit_if_stopped  # a signal during the install

if [ "$demo" = 1 ] && [ ! -d "$PROJECT_TOKENIZER" ]; then  # trained into a scratch directory, renamed when complete
  rm -rf "$PROJECT_TOKENIZER.partial"
  run "$python" -m ds_mlm.train_tokenizer --type spm --input_dir "$PROJECT_TRAIN_DIR" \
    --vocab_size "${PROJECT_DEMO_VOCAB_SIZE:-4000}" --output_dir "$PROJECT_TOKENIZER.partial"
  mv "$PROJECT_TOKENIZER.partial" "$PROJECT_TOKENIZER"
fi

if [ "$build_only" = 1 ]; then
  run "$python" -m ds_mlm.run_mlm "${args[@]}" --build_dataset_only
  exit 0
fi

# The hostfile the launcher reads (ours, or a copy of HOSTFILE: the launcher is lenient where we are strict),
# kept next to the run's output as a record of how it was started.
mkdir -p "$PROJECT_OUTPUT_DIR/launch"
launch_dir=$(cd "$PROJECT_OUTPUT_DIR/launch" && pwd)  # absolute: the launcher reads DS_ENV_FILE from anywhere
hostfile=$launch_dir/hostfile
scratch=$hostfile.$(hostname).$$  # every node of a shared file system writes the same lines: last rename wins
for ((i = 0; i < nodes; i++)); do echo "${hosts[i]} slots=${slots[i]}"; done >"$scratch"
mv "$scratch" "$hostfile"

if [ "$launcher" = torchrun ]; then
  ranks_of=torch.distributed.run
  # once a worker has ended, torchrun gives the others this long (default 30 s) before SIGKILL: the same grace
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$grace}
  cmd=("$python" -m torch.distributed.run --nnodes "$nodes" --node_rank "$node_rank"
    --nproc_per_node "${slots[node_rank]}" --master_addr "$master_addr" --master_port "$master_port"
    "${launcher_args[@]+"${launcher_args[@]}"}" "$run_mlm")
elif [ "$mode" = per-node ]; then
  ranks_of=deepspeed.launcher.launch  # the runner starts it, it starts the ranks
  cmd=("$python" -m deepspeed.launcher.runner --hostfile "$hostfile" --no_ssh --node_rank "$node_rank"
    --master_addr "$master_addr" --master_port "$master_port" "${launcher_args[@]+"${launcher_args[@]}"}" "$run_mlm")
else
  # The ranks run elsewhere: the signal goes to the runner. In pdsh mode it passes SIGTERM on to every node (pkill);
  # a backend it has no handler for (mpirun, srun) is orphaned when it dies, and gets the signal next.
  ranks_of=''
  # The other nodes' environment: the launcher exports what DS_ENV_FILE lists. Ours first, then the user's own
  # files from where the launcher would have read them (comments and blank lines dropped: it cannot parse them).
  env_file=$launch_dir/deepspeed_env
  lost_file=$launch_dir/lost_peers
  {
    echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"
    # rank 0's address for the mpirun/srun backends, which start run_mlm.py directly (pdsh's launch overrides it)
    echo "MASTER_ADDR=${master_addr:-${hosts[0]}}"
    echo "MASTER_PORT=$master_port"
    echo "DS_MLM_LOST_FILE=$lost_file"  # a rank that loses a peer writes its name there (ds_mlm/errors.py)
    for var in DS_ACCELERATOR HF_HOME HF_HUB_OFFLINE; do  # as on this node, when set here
      if [ -n "${!var:-}" ]; then echo "$var=${!var}"; fi
    done
    name=${DS_ENV_FILE:-.deepspeed_env}
    if [[ $name = /* ]]; then user_files=("$name"); else user_files=("$HOME/$name" "./$name"); fi
    for user_file in "${user_files[@]}"; do
      if [ -f "$user_file" ]; then grep -Ev '^[[:space:]]*(#|$)' "$user_file" || true; fi
    done
  } >"$env_file"
  export DS_ENV_FILE=$env_file  # an absolute name: the launcher's join(dir, name) then yields exactly this file
  backend_args=()
  if [ "$backend" != pdsh ]; then
    # srun and mpirun reach the nodes themselves: the runner's ssh check (ssh to the first host) is not theirs to
    # pass, and without --master_addr the runner would ssh there to ask for its address. Rank 0 runs on the first
    # host of the hostfile (srun and mpirun number the ranks in its order), so that is the master.
    master_addr=${master_addr:-${hosts[0]}}
    backend_args=(--no_ssh_check)
  fi
  if [ "$backend" = openmpi ] && [ -n "${OMPI_MCA_btl_tcp_if_include:-}" ]; then
    # the runner puts `--mca btl_tcp_if_include eth0` on mpirun's command line (which beats this variable) unless
    # its --launcher_args name the interface themselves; LAUNCHER_ARGS cannot carry the space this needs
    backend_args+=(--launcher_args "--mca btl_tcp_if_include $OMPI_MCA_btl_tcp_if_include")
  fi
  # pdsh's ssh sessions: a node that stops answering (dead, hung, cut off) ends its session within 4 asks
  export PDSH_SSH_ARGS_APPEND="${PDSH_SSH_ARGS_APPEND:-} -o ServerAliveInterval=$ssh_alive -o ServerAliveCountMax=4"

  # Before any rank starts, every node is checked at once over ssh (ds_mlm/hosts.py): reachable, this Python and the
  # project, corpus and tokenizer at the same paths, the master address answering, the interface variables naming
  # interfaces it has. One line per problem, exit status 2, nothing started.
  checks=()
  kind=''
  for arg in "${args[@]+"${args[@]}"}"; do
    case $arg in
      --train_dir) kind='the corpus --train_dir' ;;
      --eval_dir) kind='the corpus --eval_dir' ;;
      --tokenizer_name_or_path) kind='the tokenizer --tokenizer_name_or_path' ;;
      --config_name) kind='the model config --config_name' ;;
      --*) kind='' ;;
      *) if [ -n "$kind" ]; then checks+=(--path "$kind=$arg"); fi ;;
    esac
  done
  echo "launch.sh: checking the nodes of $HOSTFILE (ssh, paths, master address, interfaces)"
  "$python" -m ds_mlm.hosts --prog launch.sh --hostfile "$hostfile" --env_file "$env_file" \
    --master_addr "$master_addr" --master_port "$master_port" --launcher_args "${LAUNCHER_ARGS:-}" \
    --python "$python" "${checks[@]+"${checks[@]}"}" || exit 2
  cmd=("$python" -m deepspeed.launcher.runner --hostfile "$hostfile" --master_port "$master_port"
    ${master_addr:+--master_addr "$master_addr"} "${backend_args[@]+"${backend_args[@]}"}"
    "${launcher_args[@]+"${launcher_args[@]}"}" "$run_mlm")
fi

if [ "$mode" != from-master ]; then
  run ${ranks_of:+--ranks-of "$ranks_of"} "${cmd[@]}" "${args[@]}"
else
  for ((restart = 1; ; restart++)); do
    status=0
    rm -f "$lost_file"
    run "${cmd[@]}" "${args[@]}" || status=$?
    if [ "$status" != 0 ] && [ -s "$lost_file" ]; then  # the ranks' word on whom they lost, as the last line
      echo "launch.sh: the job ended with status $status: $(head -n 1 "$lost_file")" >&2
    fi
    # 0: done; 2: a flag or input to fix; 75: stopped on a signal with a checkpoint: none is a lost node
    if [[ $status =~ ^(0|2|75)$ ]] || [ "$restart" -gt "$max_restarts" ]; then exit "$status"; fi
    answering=()
    answering_slots=()
    for ((i = 0; i < ${#hosts[@]}; i++)); do  # all at once: a cut-off node costs SSH_CHECK_SECONDS, not one each
      ssh -n -o BatchMode=yes -o ConnectTimeout="$ssh_check" -o ServerAliveInterval="$ssh_check" \
        -o ServerAliveCountMax=1 "${hosts[i]}" true >/dev/null 2>&1 &
      checking[i]=$!
    done
    for ((i = 0; i < ${#hosts[@]}; i++)); do
      if wait "${checking[i]}"; then
        answering+=("${hosts[i]}")
        answering_slots+=("${slots[i]}")
      else
        echo "launch.sh: ${hosts[i]} does not answer over ssh (within ${ssh_check} s): leaving it out" >&2
        if [ "${master_addr:-}" = "${hosts[i]}" ]; then master_addr=''; fi  # the launcher takes the first node's
      fi
    done
    [ "${#answering[@]}" -gt 0 ] || { echo "launch.sh: error: no node of $HOSTFILE answers: not restarting" >&2; exit "$status"; }
    hosts=("${answering[@]}")
    slots=("${answering_slots[@]}")
    cp "$hostfile" "$hostfile.before-restart-$restart"
    for ((i = 0; i < ${#hosts[@]}; i++)); do echo "${hosts[i]} slots=${slots[i]}"; done >"$hostfile.$$"
    mv "$hostfile.$$" "$hostfile"
    [ "$backend" = pdsh ] || master_addr=${master_addr:-${hosts[0]}}  # srun/mpirun: rank 0 on the first host
    cmd=("$python" -m deepspeed.launcher.runner --hostfile "$hostfile" --master_port "$master_port"
      ${master_addr:+--master_addr "$master_addr"} "${backend_args[@]+"${backend_args[@]}"}"
      "${launcher_args[@]+"${launcher_args[@]}"}" "$run_mlm")
    echo "launch.sh: the job ended with status $status; restart $restart of $max_restarts on ${hosts[*]}," \
      "from the newest complete checkpoint in $PROJECT_OUTPUT_DIR" >&2
  done
fi
[ "$demo" = 1 ] || exit 0
run "$python" -m ds_mlm.fill_mask "$PROJECT_OUTPUT_DIR/roberta_thai" \
  "นายกรัฐมนตรี เป็นประธานการประชุม<mask>" "The <mask> of the school was there."
exit 0
}
