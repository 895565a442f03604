# berth's OpenPBS site hook (docs/admin.md): one file, imported as two hooks,
# `berth_submit` (queuejob, on the server) and `berth` (execjob_begin, execjob_launch,
# execjob_epilogue, execjob_end, execjob_abort, on every MoM). It runs as root and
# holds no logic: each event is one run of berth-pbs with the job's fields as
# arguments (never through a shell, never with the job's environment), or, for the
# launch, the job's program put behind berth-pbs-enter. A job without the `container`
# resource is left alone.
import pwd
import subprocess

import pbs

# Set by the installer (slurm-test-env/pbs-up does it with sed): absolute paths.
BERTH_PBS = "/usr/local/sbin/berth-pbs"
BERTH_PBS_ENTER = "/usr/local/sbin/berth-pbs-enter"
# "" means the default, /etc/berth/berth.toml; it must be root's (berth refuses others).
BERTH_CONFIG = ""
# berth-pbs gives the container half of $prologalarm's default (300 s); this hook's alarm
# must be above that (pbs-up and docs/admin.md set 300).
TIMEOUT = 290

# glibc's unsecure variables (unsecvars.h), by prefix where it has families of them.
DROPPED_BY_SETUID = ("LD_", "MALLOC_", "GLIBC_", "GCONV_PATH", "GETCONF_DIR", "HOSTALIASES",
                     "LOCALDOMAIN", "LOCPATH", "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF",
                     "RES_OPTIONS", "TMPDIR", "TZDIR")

e = pbs.event()
job = e.job


def image():
    try:
        value = job.Resource_List["container"]
    except Exception:
        return None
    return None if value is None else str(value)


def berth_pbs(*args):
    """Runs berth-pbs openpbs ARGS; (exit status, its last stderr line)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if BERTH_CONFIG:
        env["BERTH_CONFIG"] = BERTH_CONFIG
    try:
        done = subprocess.run([BERTH_PBS, "openpbs"] + [str(a) for a in args], env=env, cwd="/",
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=TIMEOUT)
    except (OSError, subprocess.SubprocessError) as err:
        return 1, "berth: cannot run %s: %s" % (BERTH_PBS, err)
    lines = [l for l in done.stderr.decode("utf-8", "replace").splitlines() if l.strip()]
    return done.returncode, lines[-1] if lines else ""


def log(line):
    pbs.logmsg(pbs.LOG_DEBUG, "berth: %s" % line)


value = image()
if value is None:
    e.accept()

if e.type == pbs.QUEUEJOB:
    rc, line = berth_pbs("check", "--resource", value)
    if rc != 0:
        # qsub prints "qsub: <line>" and creates no job.
        e.reject(line or "berth: container=%s is refused" % value)
elif e.type == pbs.EXECJOB_BEGIN:
    user = str(job.euser)
    args = ["begin", "--job", job.id, "--user", user, "--uid", pwd.getpwnam(user).pw_uid,
            "--resource", value, "--nodefile", "%s/aux/%s" % (pbs.pbs_conf["PBS_HOME"], job.id)]
    # MoM hooks see exec_host2 (host:port/index*ncpus+...); exec_host is None there.
    hosts = job.exec_host2 if job.exec_host2 is not None else job.exec_host
    if hosts is not None:
        args += ["--exec-host", str(hosts)]
    if job.schedselect is not None:
        args += ["--select", str(job.schedselect)]
    try:
        workdir = job.Variable_List["PBS_O_WORKDIR"]
    except Exception:
        workdir = None
    if workdir:
        args += ["--submit-dir", str(workdir)]
    log(" ".join(str(a) for a in args))
    rc, line = berth_pbs(*args)
    if line:
        log(line)
    if rc != 0:
        # Only when the failure could not even be recorded for the launch.
        e.reject(line)
elif e.type == pbs.EXECJOB_LAUNCH:
    # The top shell (argv empty, pbs_mom makes argv[0] "-berth-pbs-enter") and TM
    # tasks (argv[0] the program) run as the job user through the setuid launcher.
    program = str(e.progname)
    argv = [str(a) for a in e.argv]
    # The launcher reads /etc/berth/berth.toml only (it takes no config from its caller).
    new = [BERTH_PBS_ENTER]
    new += ["--job", str(job.id), "--", program] + argv[1:]
    # The C library of a setuid program drops these before it runs; the launcher gives
    # them back to the job's program from BERTH_PBS_ENV_<NAME>.
    for name in list(e.env.keys()):
        if str(name).startswith(DROPPED_BY_SETUID):
            e.env["BERTH_PBS_ENV_" + str(name)] = e.env[name]
    e.progname = BERTH_PBS_ENTER
    e.argv = new
elif e.type in (pbs.EXECJOB_EPILOGUE, pbs.EXECJOB_END, pbs.EXECJOB_ABORT):
    rc, line = berth_pbs("end", "--job", job.id)
    if rc != 0:
        log(line)
e.accept()
