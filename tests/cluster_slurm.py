"""Slurm on the test cluster (tests/cluster.py): munged, slurmctld on the head, one slurmd per host. Real sbatch,
srun and scontrol; nothing faked.

    slurm = Slurm(cluster)                      # or the module-scoped `slurm` fixture (tests/conftest.py)
    job = slurm.sbatch("slurm/pretrain.sbatch", out=tmp / "job.out", env={...}, options=["--nodes=2"])
    slurm.wait_for(job, "RUNNING")              # a job's state, within a bound
    slurm.scontrol("requeue", job)
    record = slurm.finish(job)                  # its final `scontrol show job` record; no process of it left

Everything is in `cluster.tmp/slurm`: the munge key (1024 random bytes, mode 400) and munged's socket (a Unix socket
on the shared file system, so every host's daemons and clients reach the one munged), slurm.conf, the controller's
state, each slurmd's spool, pid and log files. The daemons run in the foreground inside their hosts (cluster.popen,
`exec`: the Popen is the daemon), so stopping them, and the cluster's own teardown, leaves nothing behind.
slurm.conf follows shared/notes/test-cluster.md (no cgroups: proctrack/linuxproc, task/none; no accounting), with
`cred_expire=10` (a requeued job may start 10 s after it ended, not Slurm's default 120) and MinJobAge 3600 (a
finished job's record stays readable by `scontrol show job`).
"""

import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}
CPUS_PER_NODE = 2  # what each slurmd offers: one or two ranks per node (the machine has 2 cores in all)


def unavailable() -> str | None:
    """Why Slurm cannot run on the test cluster here (one line), or None."""
    missing = [t for t in TOOLS if shutil.which(t) is None and not os.access(f"/usr/sbin/{t}", os.X_OK)]
    if missing:
        return (f"the Slurm tests need {', '.join(missing)}: bash tests/run.sh installs them as root "
                "(slurmd slurmctld slurm-client munge)")
    return None


def _which(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


def _of_job(pid: int, job: int) -> bool:
    try:
        if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"slurmstepd: [{job}.".encode()):
            return True
        return f"SLURM_JOB_ID={job}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone meanwhile
        return False


class Slurm:
    """A Slurm cluster over `cluster.hosts` (the nodes, one partition `test`), controlled from `cluster.head`."""

    def __init__(self, cluster, nodes=None):
        self.cluster = cluster
        self.nodes = list(nodes or cluster.hosts)
        self.dir = Path(cluster.tmp) / "slurm"
        self.conf = self.dir / "slurm.conf"
        self.env = {**cluster.env, "SLURM_CONF": str(self.conf)}
        for key in [k for k in self.env if k.startswith("SLURM_")]:  # a test run inside a Slurm job: not that one
            if key != "SLURM_CONF":
                del self.env[key]
        self.daemons = {}  # name -> Popen
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # -- commands from the head ------------------------------------------------------------------------------------

    def run(self, cmd: str, timeout: float = 60, check: bool = True, env=None, cwd=None) -> subprocess.CompletedProcess:
        """A shell command on the head with SLURM_CONF set (`env`: more variables)."""
        return self.cluster.run(self.cluster.head, cmd, timeout=timeout, check=check, env={**self.env, **(env or {})},
                                cwd=cwd)

    def scontrol(self, *args, check: bool = True) -> str:
        return self.run("scontrol " + " ".join(shlex.quote(str(a)) for a in args), check=check).stdout

    def sbatch(self, script, out: Path, env=None, options=(), args=(), cwd=None) -> int:
        """Submit `script` (run from `cwd`, the repository by default) with its output appended to `out`; the job id.
        `env` is added to the cluster's environment, which sbatch passes on to the job."""
        cmd = ["sbatch", "--parsable", f"--output={out}", *options, str(script), *args]
        proc = self.run(" ".join(shlex.quote(str(c)) for c in cmd), env=env, cwd=cwd)
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job: int) -> dict:
        """The job's `scontrol show job` record as a dict (JobState, Restarts, NodeList, ExitCode, ...)."""
        text = self.scontrol("show", "job", "--oneliner", job)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for(self, job: int, *states: str, timeout: float = 240, out: Path | None = None,
                 until=None) -> dict:
        """Poll until the job's state is one of `states` (and `until(record)` holds, when given); the record. Past
        `timeout` (or at a final state that was not asked for) fail, showing the record and the job's output."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.job(job)
            if record.get("JobState") in states and (until is None or until(record)):
                return record
            if record.get("JobState") in DONE or time.monotonic() > deadline:
                tail = Path(out).read_text(errors="replace")[-6000:] if out and Path(out).exists() else ""
                raise AssertionError(f"job {job}: waited for {states} but it is {record.get('JobState')} "
                                     f"({record.get('Reason')}, ExitCode {record.get('ExitCode')}, Restarts "
                                     f"{record.get('Restarts')})\n--- its output\n{tail}")
            time.sleep(0.5)

    def job_pids(self, host: str, job: int | None = None) -> list[int]:
        """Processes inside `host` other than the Slurm daemons (and the cluster's own sshd and init); with `job`, only
        that job's: its slurmstepds (`slurmstepd: [JOB.STEP]`) and what runs with its SLURM_JOB_ID."""
        daemons = {p.pid for p in self.daemons.values()}
        return [p for p in self.cluster.pids(host) if p not in daemons and (job is None or _of_job(p, job))]

    def finish(self, job: int, out: Path, timeout: float = 300) -> dict:
        """Wait for the job to end (any final state) and for every process of it to be gone; its final record."""
        record = self.wait_for(job, *DONE, timeout=timeout, out=out)
        deadline = time.monotonic() + 60  # slurmstepd reports the end before its last processes are reaped
        while True:
            left = {h: pids for h in self.nodes if (pids := self.job_pids(h, job))}
            if not left:
                return record
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} is {record['JobState']} but processes are left: {left}")
            time.sleep(0.5)

    # -- making it -------------------------------------------------------------------------------------------------

    def _start(self):
        d = self.dir
        (d / "munge").mkdir(parents=True)
        (d / "state").mkdir()
        key = d / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        c = self.cluster
        self._daemon("munged", c.head, f"{_which('munged')} --foreground --force --key-file={key} "
                     f"--socket={d}/munge/sock --pid-file={d}/munged.pid --log-file={d}/munged.log "
                     f"--seed-file={d}/munged.seed")
        self._wait(lambda: (d / "munge" / "sock").exists(), "munged's socket", d / "munged.log")
        nodes = "".join(f"NodeName={n} NodeAddr={c.addr(n)} CPUs={CPUS_PER_NODE} State=UNKNOWN\n" for n in self.nodes)
        self.conf.write_text(
            f"ClusterName=dsmlmtest\nSlurmctldHost={c.head}({c.addr(c.head)})\nSlurmUser=root\nSlurmdUser=root\n"
            f"AuthType=auth/munge\nAuthInfo=socket={d}/munge/sock,cred_expire=10\nCredType=cred/munge\n"
            f"StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool-%n\nSlurmctldPidFile={d}/slurmctld.pid\n"
            f"SlurmdPidFile={d}/slurmd-%n.pid\nSlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd-%n.log\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nSelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_CPU\nReturnToService=2\nMpiDefault=none\nJobAcctGatherType=jobacct_gather/none\n"
            "AccountingStorageType=accounting_storage/none\nMailProg=/bin/true\nMinJobAge=3600\nKillWait=30\n"
            "SlurmctldTimeout=30\nSlurmdTimeout=60\nInactiveLimit=0\n"
            f"{nodes}PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP\n")
        self._daemon("slurmctld", c.head, f"{_which('slurmctld')} -D -i -f {self.conf}")
        for node in self.nodes:
            self._daemon(f"slurmd-{node}", node, f"{_which('slurmd')} -D -N {node} -f {self.conf}")

        def idle():
            out = self.run("sinfo -h -N -o '%N %T'", check=False).stdout.split()
            return sorted(out[0::2]) == sorted(self.nodes) and set(out[1::2]) == {"idle"}
        self._wait(idle, "every slurmd idle in sinfo", d / "slurmctld.log", bound=60)

    def _daemon(self, name: str, host: str, cmd: str):
        log = open(self.dir / f"{name}.stderr", "w")
        self.daemons[name] = self.cluster.popen(host, f"exec {cmd}", env=self.env, stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=subprocess.STDOUT)

    def _wait(self, ready, what: str, log: Path, bound: float = 30):
        deadline = time.monotonic() + bound
        while not ready():
            dead = [n for n, p in self.daemons.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "".join(f"\n--- {f.name}\n{f.read_text(errors='replace')[-2000:]}"
                               for f in sorted(self.dir.glob("*.stderr")) + [log] if f.exists())
                raise RuntimeError(f"test Slurm: no {what} within {bound:.0f} s (exited: {dead or 'none'}){logs}")
            time.sleep(0.2)

    def close(self):
        """Stop the daemons (SIGTERM, then SIGKILL after 10 s); the cluster's teardown removes whatever is left."""
        for proc in self.daemons.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.daemons.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
