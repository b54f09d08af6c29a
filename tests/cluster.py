"""A test cluster of real hosts on one machine: network namespaces on a private bridge, each with its own sshd.

    cluster = Cluster(tmp_path_factory.mktemp("cluster"), n_hosts=3)   # or the module-scoped `cluster` fixture
    cluster.hosts ["n1", "n2", "n3"], cluster.head "head"             # every one is a host (sshd, hostname, mounts)
    cluster.run(cluster.head, "pdsh -w n1,n2 hostname")              # real ssh, real pdsh, nothing faked

Layout (names carry a per-cluster prefix `dsmlm<pid>x<k>`, so two runs never collide):
- `<prefix>-sw`: a namespace that holds only the bridge `br0` and one veth end per host; it has no link to the
  machine's own network, so test traffic stays between test hosts.
- `<prefix>-<host>`: a host's network namespace; its `eth0` is the other veth end, address `<subnet>.<k>/24`.
- per host, an "init" process (`sleep infinity`) entered with `nsenter --net=/run/netns/X unshare --uts --mount`
  that holds the host's own hostname (UTS) and mount namespace: there `/etc/hosts` is a bind mount of the cluster's
  hosts file (hosts resolve each other by name), and `/run` and `/dev/shm` are the host's own tmpfs. Not
  `ip netns exec`: it remounts /sys and the cgroup mounts disappear (slurmd needs them). Every command enters all
  three namespaces of the init (`nsenter -t PID --net --uts --mount`).
- per host, an sshd listening on its address with a host key and an authorized key made for the test; the client
  side is an ssh config plus a two-line `ssh` wrapper first on `cluster.env["PATH"]` (pdsh's ssh module and
  OpenMPI's rsh agent find it there). Nothing in ~/.ssh or /etc changes.
All hosts share the machine's file system (like NFS). Teardown kills every process of every host and deletes the
namespaces; namespaces left by a crashed earlier run (a prefix whose pid is gone) are removed at start.
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

NETNS_DIR = Path("/run/netns")
NAME = re.compile(r"^dsmlm(\d+)x\d+-")
TOOLS = ("ip", "nsenter", "unshare", "ssh", "ssh-keygen", "pdsh", "mount")
SSHD = "/usr/sbin/sshd"
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def unavailable() -> str | None:
    """Why this machine cannot host a test cluster (one line), or None where it can."""
    if os.geteuid() != 0:
        return "the test cluster needs root (network, UTS and mount namespaces); CI runs as root"
    missing = [t for t in TOOLS if shutil.which(t) is None] + ([] if os.access(SSHD, os.X_OK) else [SSHD])
    if missing:
        return (f"the test cluster needs {', '.join(missing)}: bash tests/run.sh installs them as root "
                "(openssh-server pdsh iproute2 util-linux)")
    probe = f"dsmlm{os.getpid()}x0-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"the test cluster cannot make a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped (an orphan in a host is reparented to the machine's init)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def netns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def remove_netns(ns: str, bound: float = 20.0):
    """Kill every process in namespace `ns` (SIGKILL, until none is left or the bound passes), then delete it."""
    deadline = time.monotonic() + bound
    while True:
        pids = netns_pids(ns)
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def remove_stale():
    """Remove namespaces of earlier test clusters whose creating process is gone (a crash, a SIGKILL of pytest)."""
    if not NETNS_DIR.is_dir():
        return
    for entry in NETNS_DIR.iterdir():
        m = NAME.match(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            remove_netns(entry.name)


def free_subnet() -> str:
    """A 10.x.y /24 that no interface of this machine uses (the first three octets)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for x in range(200, 250):
        for y in range(1, 255, 17):
            net = f"10.{x}.{(y + os.getpid()) % 250 + 1}"
            if f" {net}." not in used:
                return net
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test cluster")


class Cluster:
    """`n_hosts` hosts n1..nN plus a head, made in `tmp` (keys, configs, logs); `close()` removes everything."""

    _count = 0

    def __init__(self, tmp: Path, n_hosts: int = 3, subnet: str | None = None):
        Cluster._count += 1
        self.tmp = Path(tmp)
        self.prefix = f"dsmlm{os.getpid()}x{Cluster._count}"
        self.hosts = [f"n{i}" for i in range(1, n_hosts + 1)]
        self.head = "head"
        self.subnet = subnet or free_subnet()
        self._addr = {self.head: f"{self.subnet}.1", **{h: f"{self.subnet}.{i + 2}" for i, h in enumerate(self.hosts)}}
        self._init = {}     # host -> Popen of its init (holder of its UTS and mount namespaces)
        self._sshd = {}     # host -> Popen of its sshd
        self._children = []  # Popen of every cluster.popen, reaped at close
        self.closed = False
        remove_stale()
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    # -- the interface ---------------------------------------------------------------------------------------------

    @property
    def all_hosts(self) -> list[str]:
        return [self.head, *self.hosts]

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def addr(self, host: str) -> str:
        return self._addr[host]

    def enter(self, host: str) -> list[str]:
        """The argv prefix that runs a command inside `host` (its network, UTS and mount namespaces)."""
        return ["nsenter", "-t", str(self._init[host].pid), "--net", "--uts", "--mount", "--"]

    def run(self, host: str, cmd: str, timeout: float = 120, cwd=None, env=None, check=False,
            **kw) -> subprocess.CompletedProcess:
        """`cmd` (a shell command) inside `host`, output captured as text; cwd defaults to this process's."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        proc = subprocess.run(self._argv(host, cmd, cwd), env=env or self.env, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"[{host}] {cmd} exited {proc.returncode}\n--- stdout\n{(proc.stdout or '')[-4000:]}"
                                 f"\n--- stderr\n{(proc.stderr or '')[-6000:]}")
        return proc

    def popen(self, host: str, cmd: str, cwd=None, env=None, **kw) -> subprocess.Popen:
        """`cmd` started inside `host`; its pid is the shell's (nsenter does not fork). Killed at close if alive."""
        proc = subprocess.Popen(self._argv(host, cmd, cwd), env=env or self.env, **kw)
        self._children.append(proc)
        return proc

    def pids(self, host: str) -> list[int]:
        """Processes inside `host` other than its init and its sshd (the listener and its per-connection processes,
        which end by themselves once the command they serve has ended)."""
        return [p for p in netns_pids(self.ns(host)) if p != self._init[host].pid and _exe(p) != SSHD
                and _alive(p)]

    def cut(self, host: str):
        """Take the host's link down: its peers get no reset, packets to and from it are dropped."""
        subprocess.run(["ip", "-n", self.ns(host), "link", "set", "eth0", "down"], check=True)

    def restore(self, host: str):
        subprocess.run(["ip", "-n", self.ns(host), "link", "set", "eth0", "up"], check=True)

    def kill(self, host: str):
        """kill -9 of every job process of the host (its sshd and init live on)."""
        for pid in self.pids(host):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def hostfile(self, hosts, slots: int = 1) -> Path:
        path = self.tmp / f"hostfile-{'-'.join(hosts)}-{slots}"
        path.write_text("".join(f"{h} slots={slots}\n" for h in hosts))
        return path

    def close(self):
        """Kill every process of every host and delete the namespaces (also after a partial start)."""
        if self.closed:
            return
        self.closed = True
        for proc in self._children:
            if proc.poll() is None:
                proc.kill()
        for host in self.all_hosts:
            if NETNS_DIR.joinpath(self.ns(host)).exists():
                remove_netns(self.ns(host))
        for proc in [*self._children, *self._init.values(), *self._sshd.values()]:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if NETNS_DIR.joinpath(self.ns("sw")).exists():
            remove_netns(self.ns("sw"))

    # -- making it -------------------------------------------------------------------------------------------------

    def _argv(self, host, cmd, cwd):
        return [*self.enter(host), "sh", "-c", f"cd {shlex.quote(str(cwd or os.getcwd()))} && {cmd}"]

    def _ip(self, *args):
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def _make(self):
        t = self.tmp
        t.mkdir(parents=True, exist_ok=True)
        sw = self.ns("sw")
        self._ip("netns", "add", sw)
        self._ip("-n", sw, "link", "add", "br0", "type", "bridge")
        self._ip("-n", sw, "link", "set", "br0", "up")
        (t / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, a in self._addr.items()))
        for i, host in enumerate(self.all_hosts):
            ns = self.ns(host)
            self._ip("netns", "add", ns)
            self._ip("-n", sw, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip("-n", sw, "link", "set", f"v{i}", "master", "br0", "up")
            self._ip("-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._make_keys()
        for host in self.all_hosts:
            self._start_init(host)
        for host in self.all_hosts:
            self._start_sshd(host)
        self._wait_for_sshd()

    def _start_init(self, host):
        ready = self.tmp / f"init-{host}.ready"
        # private propagation (unshare's default): nothing mounted here reaches the machine's own namespace
        script = (f"hostname {host} && mount --bind {self.tmp}/hosts /etc/hosts && mount -t tmpfs -o mode=755 "
                  f"tmpfs /run && mkdir -m 755 /run/sshd && mount -t tmpfs tmpfs /dev/shm && touch {ready} "
                  "&& exec sleep infinity")
        proc = subprocess.Popen(["nsenter", f"--net={NETNS_DIR / self.ns(host)}", "unshare", "--uts", "--mount",
                                 "--propagation", "private", "sh", "-c", script],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(self.tmp / f"init-{host}.log", "w"))
        self._init[host] = proc
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"test cluster: host {host} did not start: "
                                   f"{(self.tmp / f'init-{host}.log').read_text().strip()}")
            time.sleep(0.02)

    def _make_keys(self):
        t = self.tmp
        for key in ("id_ed25519", "hostkey"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(t / key)], check=True)
        (t / "authorized_keys").write_text((t / "id_ed25519.pub").read_text())
        # Only what a user's ~/.ssh/config holds for a cluster (key, known hosts): no timeouts or keep-alives, so
        # that the product's own ssh options are what the tests exercise.
        (t / "ssh_config").write_text(
            f"Host *\n  User root\n  IdentityFile {t}/id_ed25519\n  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
        bin_dir = t / "bin"
        bin_dir.mkdir(exist_ok=True)
        wrapper = bin_dir / "ssh"
        wrapper.write_text(f"#!/bin/sh\nexec /usr/bin/ssh -F {t}/ssh_config \"$@\"\n")
        wrapper.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
        env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
        self.env = env

    def _start_sshd(self, host):
        t = self.tmp
        conf = t / f"sshd_config-{host}"
        conf.write_text(
            f"ListenAddress {self.addr(host)}\nPort 22\nHostKey {t}/hostkey\nAuthorizedKeysFile {t}/authorized_keys\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nUseDNS no\nPrintMotd no\nMaxStartups 100\nMaxSessions 100\n"
            f"PidFile {t}/sshd-{host}.pid\nSubsystem sftp internal-sftp\n")
        # -D: stays in the foreground, so its pid is this Popen's (nsenter does not fork); -e: log to stderr
        self._sshd[host] = subprocess.Popen([*self.enter(host), SSHD, "-D", "-e", "-f", str(conf)],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=open(t / f"sshd-{host}.log", "w"))

    def _wait_for_sshd(self, bound: float = 30.0):
        deadline = time.monotonic() + bound
        for host in self.all_hosts:
            while True:
                if self._sshd[host].poll() is not None:
                    raise RuntimeError(f"test cluster: sshd of {host} exited: "
                                       f"{(self.tmp / f'sshd-{host}.log').read_text().strip()}")
                if (self.tmp / f"sshd-{host}.pid").exists():
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"test cluster: sshd of {host} did not start within {bound:.0f} s")
                time.sleep(0.05)
        # One real round trip from the head to every host: the cluster is usable when this passes.
        names = ",".join(self.hosts)
        proc = self.run(self.head, f"pdsh -R ssh -w {names} hostname", timeout=bound)
        got = sorted(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if ":" in line)
        if got != sorted(self.hosts):
            raise RuntimeError(f"test cluster: pdsh from the head reached {got}, not {self.hosts}: "
                               f"{proc.stderr.strip()}")

