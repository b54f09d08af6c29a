"""Before any rank starts: can every node of the hostfile run this job? One line per problem, then exit status 2.

launch.sh runs it in the from-the-master mode (HOSTFILE, the deepspeed launcher over pdsh or another ssh backend),
after writing the job's hostfile and environment file and before the launcher; it can also run alone:

    python -m ds_mlm.hosts --hostfile F [--env_file F] [--master_addr A] [--master_port P] [--path KIND=PATH ...]

What is checked, every host at once, each over one ssh session (BatchMode: no prompt; ConnectTimeout: a dead host
costs seconds, not minutes):
- pdsh is on this node's PATH (the deepspeed launcher's default backend starts every node with it);
- ssh reaches the host (else ssh's own last line: "Connection refused", "Could not resolve hostname", ...);
- this node's Python (the repository's .venv) is at the same path there: the launcher runs exactly that file;
- the project (this run_mlm.py) and each --path (the corpus, the tokenizer) exist there at the same path;
- the master address answers from the host: a TCP connection to MASTER_ADDR:MASTER_PORT is accepted or refused
  (nothing listens yet: a refusal proves the address is reached), not timed out or unreachable;
- NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, as the ranks will get them (this environment, then the env file's lines,
  last one wins), name interfaces the host has (NCCL: a prefix, `=name` exact, `^...` an exclusion list: skipped).
Nothing is started and nothing is written on the hosts.
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

CONNECT_TIMEOUT = 5  # seconds for ssh to reach a host
SESSION_TIMEOUT = 30  # seconds for one host's whole check, ssh included
MASTER_TIMEOUT = 3  # seconds for a host's TCP connection to the master address
EXTRA_SSH: list[str] = []  # -p PORT, from the launcher's --ssh_port
IFNAME_VARS = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}", "-o", "ServerAliveInterval=5",
               "-o", "ServerAliveCountMax=2"]

# Runs on the host with this node's Python: prints one `problem: ...` line per problem. argv: master addr, port, then
# VAR=VALUE of the interface variables.
REMOTE_PY = r"""
import socket, sys
master, port = sys.argv[1], int(sys.argv[2])
names = [n for _, n in socket.if_nameindex()]
for item in sys.argv[3:]:
    var, value = item.split("=", 1)
    if var.startswith("NCCL") and value.startswith("^"):
        continue  # an exclusion list cannot name a missing interface
    for want in filter(None, value.split(",")):
        exact = var.startswith("GLOO") or want.startswith("=")
        want = want.lstrip("=")
        if not any(n == want if exact else n.startswith(want) for n in names):
            print(f"problem: {var}={value} names no interface of this node (it has {', '.join(names)}): set it to an "
                  "interface every node has (in .deepspeed_env)")
if master:
    try:
        socket.create_connection((master, port), timeout=MASTER_TIMEOUT).close()
    except ConnectionRefusedError:
        pass  # reached: nothing listens yet
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        print(f"problem: the master address {master}:{port} does not answer from this node ({why}): set MASTER_ADDR "
              "to an address of the first node that every node reaches, and open MASTER_PORT between the nodes")
""".replace("MASTER_TIMEOUT", str(MASTER_TIMEOUT))


def read_hostfile(path: str) -> list[str]:
    """The host names of a DeepSpeed hostfile (launch.sh has already validated its lines)."""
    hosts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                hosts.append(line.split()[0])
    return hosts


def launcher_view(launcher_args: str, hosts: list[str]) -> tuple[str, list[str], list[str]]:
    """(backend, the hosts the launcher will use, extra ssh options) from the deepspeed launcher's own flags:
    --launcher, --include/--exclude (`host1@host2:0,1`: a host named with slots keeps its other slots), --ssh_port."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in ("--launcher", "--include", "--exclude", "--ssh_port"):
        parser.add_argument(flag, default="")
    known, _ = parser.parse_known_args(shlex.split(launcher_args))

    def named(spec, whole_only):
        return {part.split(":")[0] for part in spec.split("@") if part and not (whole_only and ":" in part)}

    if known.include:
        hosts = [h for h in hosts if h in named(known.include, False)]
    if known.exclude:
        hosts = [h for h in hosts if h not in named(known.exclude, True)]
    return (known.launcher or "pdsh").lower(), hosts, (["-p", known.ssh_port] if known.ssh_port else [])


def ifname_values(env_file: str | None) -> dict[str, str]:
    """The interface variables as the ranks get them: this environment, then the env file (last line wins)."""
    values = {v: os.environ[v] for v in IFNAME_VARS if os.environ.get(v)}
    if env_file and os.path.isfile(env_file):
        with open(env_file, encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and key in IFNAME_VARS:
                    values[key] = value.strip().strip("\"'")
    return values


def remote_script(python: str, paths: list[tuple[str, str]], master: str, port: int, ifnames: dict) -> str:
    """The shell command one ssh session runs on a host: paths first, then the Python part (if the Python is there)."""
    q = shlex.quote
    missing = "is not there: every node needs it at the same path (a shared file system, or rsync -a)"
    lines = [f"[ -e {q(p)} ] || echo {q(f'problem: {kind} {p} {missing}')}" for kind, p in paths]
    no_python = (f"problem: no {python} (the Python of this node): put the repository and its .venv at the same path "
                 "on every node (bash scripts/bootstrap.sh there)")
    variables = " ".join(q(f"{k}={v}") for k, v in ifnames.items())
    lines.append(f"if [ -x {q(python)} ]; then exec {q(python)} -c {q(REMOTE_PY)} {q(master)} {port} {variables}; "
                 f"else echo {q(no_python)}; fi")
    return "\n".join(lines)


def ssh(host: str, command: str, timeout: float = SESSION_TIMEOUT) -> tuple[int, str, str]:
    try:
        proc = subprocess.run(["ssh", *SSH_OPTIONS, *EXTRA_SSH, host, command], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return 255, "", f"no answer within {timeout:.0f} s"
    return proc.returncode, proc.stdout, proc.stderr


def ssh_failure(host: str, stderr: str) -> str:
    said = [line.strip() for line in stderr.splitlines() if line.strip()]
    return (f"{host}: ssh cannot reach it ({said[-1] if said else 'no message'}): every node of the hostfile needs "
            f"passwordless ssh from this node (try: ssh {host} true)")


def master_address(first_host: str) -> tuple[str, str | None]:
    """What the deepspeed launcher uses when MASTER_ADDR is not given: the first address `hostname -I` prints on
    the first node. (address, problem)."""
    code, out, err = ssh(first_host, "hostname -I")
    if code == 255:
        return "", ssh_failure(first_host, err)
    if code != 0 or not out.split():
        return "", f"{first_host}: `hostname -I` gave no address: set MASTER_ADDR to the first node's address"
    return out.split()[0], None


def check_host(host: str, script: str) -> list[str]:
    code, out, err = ssh(host, script)
    if code == 255:
        return [ssh_failure(host, err)]
    problems = [f"{host}: {line[len('problem: '):]}" for line in out.splitlines() if line.startswith("problem: ")]
    if code != 0 and not problems:
        problems.append(f"{host}: the check exited {code}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    return problems


def check(hosts: list[str], python: str, paths: list[tuple[str, str]], master_addr: str, master_port: int,
          env_file: str | None, launcher: str = "pdsh") -> list[str]:
    """Every problem found, one line each ([] when the job can start). Slurm's srun reaches the nodes itself."""
    if launcher == "slurm" or not hosts:
        return []
    if launcher == "pdsh" and shutil.which("pdsh") is None:
        return ["pdsh is not installed on this node (the deepspeed launcher starts the other nodes with it): install "
                "it (apt-get install pdsh), or choose another backend with LAUNCHER_ARGS=\"--launcher openmpi\""]
    problems = []
    if not master_addr:
        master_addr, problem = master_address(hosts[0])
        problems += [problem] if problem else []
    script = remote_script(python, paths, master_addr, master_port, ifname_values(env_file))
    with ThreadPoolExecutor(max_workers=min(64, len(hosts))) as pool:
        for found in pool.map(lambda h: check_host(h, script), hosts):
            problems += [p for p in found if p not in problems]
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_mlm.hosts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hostfile", required=True, help="the job's hostfile (HOST slots=N lines)")
    parser.add_argument("--env_file", help="the environment file the launcher hands the nodes (DS_ENV_FILE)")
    parser.add_argument("--master_addr", default="", help="MASTER_ADDR (default: the launcher's choice)")
    parser.add_argument("--master_port", type=int, default=29500, help="MASTER_PORT")
    parser.add_argument("--launcher_args", default="", help="the deepspeed launcher's own flags (LAUNCHER_ARGS): "
                        "--launcher, --include, --exclude and --ssh_port are followed")
    parser.add_argument("--python", default=sys.executable, help="the Python every node must have")
    parser.add_argument("--path", action="append", default=[], metavar="KIND=PATH",
                        help="a path every node needs, e.g. 'the corpus --train_dir=/data/train' (checked where it "
                             "exists here)")
    parser.add_argument("--prog", default="ds_mlm.hosts", help="the name errors start with")
    args = parser.parse_args(argv)
    project = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_mlm.py")
    paths = [("the project", project), *(p.partition("=")[::2] for p in args.path)]
    paths = [(kind, os.path.abspath(p)) for kind, p in paths if p and os.path.exists(p)]
    launcher, hosts, EXTRA_SSH[:] = launcher_view(args.launcher_args, read_hostfile(args.hostfile))
    problems = check(hosts, args.python, paths, args.master_addr, args.master_port, args.env_file, launcher)
    for problem in problems:
        print(f"{args.prog}: error: {problem}", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
