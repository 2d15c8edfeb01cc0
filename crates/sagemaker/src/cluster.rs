//! The multi-host protocol, run by every container's `trainer` process.
//!
//! - Every host starts sshd (the image holds one key pair, trusted by every
//!   container of the image, so the hosts of a job can reach each other).
//! - The leader waits until each worker's sshd answers: the name must resolve
//!   (SageMaker's DNS entries for the other hosts can lag the container start)
//!   and port 22 must accept a connection, retried within a bounded total wait.
//!   Then it runs `mpirun`, which starts the ranks on every host over ssh.
//! - A worker's own process has nothing to run; it must stay alive while the
//!   job runs (SageMaker ends the job when the containers exit). It waits for a
//!   done-file that the leader writes on it over ssh when the job ends, holding
//!   the exit status. Why a done-file rather than watching for `orted`: it also
//!   covers a leader that fails before `mpirun` starts, or trains alone; it
//!   carries the status; and no process name or start race is involved. If
//!   the leader's sshd stops answering for a while (its container is gone
//!   without a word), the worker gives up with an error instead of waiting
//!   for the job's time limit.
//! - SIGTERM (SageMaker's stop, 120 s before SIGKILL) reaches only each
//!   container's main process. The leader and the workers pass it on to the
//!   ranks of their own host, found by the [`RANK_ENV`] marker in their
//!   environment, and keep waiting: the ranks checkpoint and exit, `mpirun`
//!   ends, and the leader signals the end as usual.

use std::collections::BTreeMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::launch::{RANK_ENV, done_command};
use crate::{Error, Result, io_err};

pub const SSH_PORT: u16 = 22;

/// Time as the waiting loops see it; tests drive them with a fake clock.
pub trait Clock {
    /// Time since an arbitrary fixed start.
    fn now(&self) -> Duration;
    fn sleep(&mut self, d: Duration);
}

#[derive(Debug)]
pub struct SystemClock {
    start: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock { start: Instant::now() }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// The knobs of the protocol, from the environment (defaults in brackets):
/// `TRAINER_SAGEMAKER_SSHD` [/usr/sbin/sshd] the command that starts sshd;
/// `TRAINER_SAGEMAKER_SSH` [ssh]; `TRAINER_SAGEMAKER_MPIRUN` [mpirun];
/// `TRAINER_SAGEMAKER_DONE_FILE` [/tmp/trainer-sagemaker/job-done];
/// `TRAINER_SAGEMAKER_PEER_WAIT_S` [600] how long to wait for the other hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub sshd: Vec<String>,
    pub ssh: String,
    pub mpirun: String,
    pub done_file: PathBuf,
    pub peer_wait: Duration,
    /// Where GPUs and EFA devices appear.
    pub dev_dir: PathBuf,
    /// Where the host's processes are listed.
    pub proc_dir: PathBuf,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            sshd: vec!["/usr/sbin/sshd".into()],
            ssh: "ssh".into(),
            mpirun: "mpirun".into(),
            done_file: "/tmp/trainer-sagemaker/job-done".into(),
            peer_wait: Duration::from_secs(600),
            dev_dir: "/dev".into(),
            proc_dir: "/proc".into(),
        }
    }
}

impl ClusterSettings {
    pub fn from_env() -> Result<Self> {
        let mut s = ClusterSettings::default();
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        if let Some(v) = var("TRAINER_SAGEMAKER_SSHD") {
            s.sshd = v.split_whitespace().map(String::from).collect();
        }
        if let Some(v) = var("TRAINER_SAGEMAKER_SSH") {
            s.ssh = v;
        }
        if let Some(v) = var("TRAINER_SAGEMAKER_MPIRUN") {
            s.mpirun = v;
        }
        if let Some(v) = var("TRAINER_SAGEMAKER_DONE_FILE") {
            s.done_file = v.into();
        }
        if let Some(v) = var("TRAINER_SAGEMAKER_PEER_WAIT_S") {
            let secs: u64 = v.trim().parse().map_err(|_| {
                Error::Cluster(format!("TRAINER_SAGEMAKER_PEER_WAIT_S = {v:?}: expected whole seconds"))
            })?;
            s.peer_wait = Duration::from_secs(secs);
        }
        Ok(s)
    }
}

/// Resolves `host` and connects to `port`: Ok when something listens there.
pub fn tcp_probe(host: &str, port: u16, timeout: Duration) -> std::result::Result<(), String> {
    let addrs = (host, port).to_socket_addrs().map_err(|e| format!("{host} does not resolve ({e})"))?;
    let mut last = format!("{host} resolves to no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("{host}:{port} ({a}) refuses ({e})"),
        }
    }
    Err(last)
}

/// Waits until `probe` succeeds for every host, retrying every `interval`
/// for at most `timeout` in all; the error names the hosts that never
/// answered and why.
pub fn wait_for_peers(
    hosts: &[String],
    timeout: Duration,
    interval: Duration,
    clock: &mut dyn Clock,
    probe: &mut dyn FnMut(&str) -> std::result::Result<(), String>,
) -> Result<()> {
    let start = clock.now();
    let mut pending: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let mut why: BTreeMap<&str, String> = BTreeMap::new();
    loop {
        pending.retain(|h| match probe(h) {
            Ok(()) => false,
            Err(e) => {
                why.insert(h, e);
                true
            }
        });
        if pending.is_empty() {
            return Ok(());
        }
        if clock.now().saturating_sub(start) >= timeout {
            let reasons: Vec<String> = pending.iter().map(|h| why.get(h).cloned().unwrap_or_default()).collect();
            return Err(Error::Cluster(format!(
                "gave up after {} s waiting for sshd on {}: {}",
                timeout.as_secs(),
                pending.join(", "),
                reasons.join("; ")
            )));
        }
        clock.sleep(interval);
    }
}

/// The status the leader left in the done-file, if it is there. Anything
/// but a number counts as a failure (1).
pub fn read_done_file(path: &Path) -> Result<Option<i32>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().parse().unwrap_or(1))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerWait {
    /// How often the done-file is checked.
    pub poll: Duration,
    /// How often the leader is probed.
    pub probe_every: Duration,
    /// How long the leader may take to answer the first time.
    pub startup_grace: Duration,
    /// How long the leader may stop answering once it has answered.
    pub lost_after: Duration,
}

impl Default for WorkerWait {
    fn default() -> Self {
        WorkerWait {
            poll: Duration::from_secs(1),
            probe_every: Duration::from_secs(10),
            startup_grace: Duration::from_secs(600),
            lost_after: Duration::from_secs(180),
        }
    }
}

/// A worker's wait for the end of the job: returns the status the leader
/// wrote to `done_file`. `stop` says whether SIGTERM came; `on_stop` runs once
/// when it does (pass the signal to this host's ranks), and waiting goes on.
pub fn wait_for_job_end(
    done_file: &Path,
    leader: &str,
    w: &WorkerWait,
    clock: &mut dyn Clock,
    probe_leader: &mut dyn FnMut() -> bool,
    stop: &dyn Fn() -> bool,
    on_stop: &mut dyn FnMut(),
) -> Result<i32> {
    let start = clock.now();
    let (mut last_ok, mut last_probe): (Option<Duration>, Option<Duration>) = (None, None);
    let mut stopped = false;
    loop {
        if let Some(status) = read_done_file(done_file)? {
            return Ok(status);
        }
        if !stopped && stop() {
            stopped = true;
            on_stop();
        }
        let now = clock.now();
        if last_probe.is_none_or(|t| now.saturating_sub(t) >= w.probe_every) {
            last_probe = Some(now);
            if probe_leader() {
                last_ok = Some(now);
            }
        }
        match last_ok {
            None if now.saturating_sub(start) > w.startup_grace => {
                return Err(Error::Cluster(format!(
                    "the leader {leader} never answered on port {SSH_PORT} within {} s",
                    w.startup_grace.as_secs()
                )));
            }
            Some(t) if now.saturating_sub(t) > w.lost_after => {
                return Err(Error::Cluster(format!(
                    "lost the leader {leader}: no answer on port {SSH_PORT} for {} s and no end-of-job signal",
                    w.lost_after.as_secs()
                )));
            }
            _ => {}
        }
        clock.sleep(w.poll);
    }
}

/// Set when SIGTERM or SIGINT arrives; the process keeps running.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&flag))
            .map_err(|e| Error::Cluster(format!("cannot handle signal {sig}: {e}")))?;
    }
    Ok(flag)
}

/// The processes of this host that `mpirun` started for the job: those whose
/// environment holds `TRAINER_SAGEMAKER_RANK=1`. Processes that vanish or
/// cannot be read are skipped.
pub fn local_rank_pids(proc_dir: &Path) -> Vec<u32> {
    let marker = format!("{RANK_ENV}=1");
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir(proc_dir) else { return Vec::new() };
    let mut pids: Vec<u32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(proc_dir.join(pid.to_string()).join("environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == marker.as_bytes()))
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Sends SIGTERM to each process; returns how many it reached.
pub fn terminate(pids: &[u32]) -> usize {
    pids.iter()
        .filter(|&&pid| {
            let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            unsafe { libc::kill(pid, libc::SIGTERM) == 0 }
        })
        .count()
}

/// Passes SIGTERM on to this host's ranks, with a line in the log.
pub fn forward_stop(proc_dir: &Path) {
    let pids = local_rank_pids(proc_dir);
    let n = terminate(&pids);
    println!("sagemaker: stop requested: passed SIGTERM to {n} local rank process(es)");
}

/// Runs `argv` to completion; when `stop` becomes true, `on_stop` runs once
/// and the wait goes on (the child is not signalled: its ranks are).
pub fn run_until_exit(argv: &[String], stop: &AtomicBool, on_stop: &mut dyn FnMut()) -> Result<ExitStatus> {
    let (prog, args) = argv.split_first().ok_or_else(|| Error::Cluster("empty command".into()))?;
    let mut child =
        Command::new(prog).args(args).spawn().map_err(|e| Error::Cluster(format!("cannot run {prog}: {e}")))?;
    let mut stopped = false;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| Error::Cluster(format!("waiting for {prog}: {e}")))? {
            return Ok(status);
        }
        if !stopped && stop.load(Ordering::SeqCst) {
            stopped = true;
            on_stop();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts sshd (it puts itself in the background) and checks it started.
pub fn start_sshd(argv: &[String]) -> Result<()> {
    let (prog, args) = argv.split_first().ok_or_else(|| Error::Cluster("no sshd command".into()))?;
    let status = Command::new(prog)
        .args(args)
        .status()
        .map_err(|e| Error::Cluster(format!("cannot start sshd ({prog}): {e}")))?;
    if !status.success() {
        return Err(Error::Cluster(format!("sshd ({prog}) failed to start: {status}")));
    }
    Ok(())
}

/// Tells every worker that the job ended with `status`, retrying each a few
/// times. Returns a warning per worker that could not be told (it will notice
/// the leader is gone once this container exits).
pub fn signal_job_end(
    workers: &[String],
    ssh: &str,
    done_file: &Path,
    status: i32,
    clock: &mut dyn Clock,
    run: &mut dyn FnMut(&[String]) -> std::result::Result<(), String>,
) -> Vec<String> {
    const ATTEMPTS: usize = 5;
    let mut warnings = Vec::new();
    for host in workers {
        let cmd = done_command(ssh, host, done_file, status);
        let mut last = String::new();
        let mut told = false;
        for attempt in 1..=ATTEMPTS {
            match run(&cmd) {
                Ok(()) => {
                    told = true;
                    break;
                }
                Err(e) => last = e,
            }
            if attempt < ATTEMPTS {
                clock.sleep(Duration::from_secs(3));
            }
        }
        if !told {
            warnings.push(format!("could not tell {host} that the job ended ({last})"));
        }
    }
    warnings
}

/// Runs a command and maps a failure to its stderr, for [`signal_job_end`].
pub fn run_quiet(argv: &[String]) -> std::result::Result<(), String> {
    let (prog, args) = argv.split_first().ok_or("empty command")?;
    let out = Command::new(prog).args(args).output().map_err(|e| format!("{prog}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{prog} {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Virtual time: sleeping advances it, nothing waits.
    #[derive(Default)]
    struct FakeClock {
        t: Duration,
    }

    impl Clock for FakeClock {
        fn now(&self) -> Duration {
            self.t
        }
        fn sleep(&mut self, d: Duration) {
            self.t += d;
        }
    }

    fn hosts(h: &[&str]) -> Vec<String> {
        h.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn peers_that_come_up_late_are_waited_for() {
        let mut clock = FakeClock::default();
        let mut calls: BTreeMap<String, u32> = BTreeMap::new();
        // algo-2's name resolves on the third try, algo-3 answers at once.
        let mut probe = |h: &str| {
            let n = calls.entry(h.to_string()).or_default();
            *n += 1;
            if h == "algo-2" && *n < 3 { Err(format!("{h} does not resolve")) } else { Ok(()) }
        };
        let hs = hosts(&["algo-2", "algo-3"]);
        wait_for_peers(&hs, Duration::from_secs(60), Duration::from_secs(2), &mut clock, &mut probe).unwrap();
        assert_eq!(calls["algo-2"], 3);
        assert_eq!(calls["algo-3"], 1, "a host that answered is not probed again");
        assert_eq!(clock.t, Duration::from_secs(4));
    }

    #[test]
    fn the_wait_for_peers_is_bounded() {
        let mut clock = FakeClock::default();
        let mut probe = |h: &str| if h == "algo-3" { Err(format!("{h} does not resolve")) } else { Ok(()) };
        let hs = hosts(&["algo-2", "algo-3"]);
        let e = wait_for_peers(&hs, Duration::from_secs(30), Duration::from_secs(2), &mut clock, &mut probe)
            .unwrap_err()
            .to_string();
        assert!(e.contains("30 s") && e.contains("algo-3 does not resolve") && !e.contains("algo-2"), "{e}");
        assert_eq!(clock.t, Duration::from_secs(30));
    }

    #[test]
    fn real_probe_names_the_host() {
        let e = tcp_probe("no-such-host.invalid", SSH_PORT, Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("no-such-host.invalid"), "{e}");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        tcp_probe("127.0.0.1", port, Duration::from_secs(5)).unwrap();
    }

    fn wait(
        done: &Path,
        clock: &mut FakeClock,
        leader_up: &dyn Fn(Duration) -> bool,
        stop_at: Option<Duration>,
    ) -> (Result<i32>, u32) {
        let stops = Cell::new(0);
        let now = Cell::new(Duration::ZERO);
        let mut probe = || leader_up(now.get());
        let stop = || stop_at.is_some_and(|s| now.get() >= s);
        let mut on_stop = || stops.set(stops.get() + 1);
        struct Tracking<'a> {
            inner: &'a mut FakeClock,
            now: &'a Cell<Duration>,
        }
        impl Clock for Tracking<'_> {
            fn now(&self) -> Duration {
                self.inner.now()
            }
            fn sleep(&mut self, d: Duration) {
                self.inner.sleep(d);
                self.now.set(self.inner.now());
            }
        }
        let mut c = Tracking { inner: clock, now: &now };
        let r = wait_for_job_end(done, "algo-1", &WorkerWait::default(), &mut c, &mut probe, &stop, &mut on_stop);
        (r, stops.get())
    }

    #[test]
    fn worker_returns_the_leaders_status() {
        let d = tempfile::tempdir().unwrap();
        let done = d.path().join("done");
        std::fs::write(&done, "3\n").unwrap();
        let (r, stops) = wait(&done, &mut FakeClock::default(), &|_| true, Some(Duration::ZERO));
        assert_eq!(r.unwrap(), 3);
        assert_eq!(stops, 0, "the done-file is checked first");
        std::fs::write(&done, "garbage").unwrap();
        assert_eq!(read_done_file(&done).unwrap(), Some(1));
        assert_eq!(read_done_file(&d.path().join("none")).unwrap(), None);
    }

    #[test]
    fn worker_gives_up_on_a_lost_leader_and_passes_sigterm_once() {
        let d = tempfile::tempdir().unwrap();
        let done = d.path().join("done");
        // The leader answers from 30 s to 100 s, then is gone; SIGTERM comes at 50 s.
        let mut clock = FakeClock::default();
        let up = |t: Duration| (30..100).contains(&t.as_secs());
        let (r, stops) = wait(&done, &mut clock, &up, Some(Duration::from_secs(50)));
        let e = r.unwrap_err().to_string();
        assert!(e.contains("lost the leader algo-1"), "{e}");
        assert_eq!(stops, 1);
        // Last answer at 90 s (probed every 10 s), lost after 180 s more.
        assert!(clock.t > Duration::from_secs(270) && clock.t <= Duration::from_secs(272), "{:?}", clock.t);

        let mut clock = FakeClock::default();
        let (r, _) = wait(&done, &mut clock, &|_| false, None);
        assert!(r.unwrap_err().to_string().contains("never answered"));
        assert!(clock.t <= Duration::from_secs(602));
    }

    #[test]
    fn job_end_is_retried_then_reported() {
        let mut clock = FakeClock::default();
        let mut seen = Vec::new();
        let mut run = |c: &[String]| {
            seen.push(c[c.len() - 2].clone());
            if c.contains(&"algo-3".to_string()) { Err("no route".to_string()) } else { Ok(()) }
        };
        let w = signal_job_end(&hosts(&["algo-2", "algo-3"]), "ssh", Path::new("/tmp/d"), 0, &mut clock, &mut run);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("algo-3") && w[0].contains("no route"), "{w:?}");
        assert_eq!(seen.iter().filter(|h| *h == "algo-3").count(), 5);
        assert_eq!(seen.iter().filter(|h| *h == "algo-2").count(), 1);
    }

    #[test]
    fn ranks_are_found_by_their_environment() {
        let d = tempfile::tempdir().unwrap();
        let proc_dir = d.path();
        for (pid, env) in [
            ("100", &b"PATH=/bin\0TRAINER_SAGEMAKER_RANK=1\0"[..]),
            ("200", b"PATH=/bin\0TRAINER_SAGEMAKER_RANK=10\0"),
            ("300", b"TRAINER_SAGEMAKER_RANK=1"),
            ("self", b"TRAINER_SAGEMAKER_RANK=1\0"),
        ] {
            std::fs::create_dir(proc_dir.join(pid)).unwrap();
            std::fs::write(proc_dir.join(pid).join("environ"), env).unwrap();
        }
        std::fs::create_dir(proc_dir.join("400")).unwrap(); // vanished: no environ
        assert_eq!(local_rank_pids(proc_dir), [100, 300]);
    }

    #[test]
    fn sigterm_reaches_a_child_and_the_launcher_keeps_waiting() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        assert_eq!(terminate(&[child.id()]), 1);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));

        let stop = AtomicBool::new(true);
        let mut calls = 0;
        let argv = hosts(&["sh", "-c", "exit 7"]);
        let status = run_until_exit(&argv, &stop, &mut || calls += 1).unwrap();
        assert_eq!(status.code(), Some(7));
        assert!(calls <= 1);
        assert!(run_until_exit(&hosts(&["/nonexistent/mpirun"]), &stop, &mut || {}).is_err());
    }

    #[test]
    fn settings_from_the_environment_have_defaults() {
        let s = ClusterSettings::default();
        assert_eq!(s.sshd, ["/usr/sbin/sshd"]);
        assert_eq!(s.peer_wait, Duration::from_secs(600));
        assert!(start_sshd(&hosts(&["true"])).is_ok());
        let e = start_sshd(&hosts(&["false"])).unwrap_err().to_string();
        assert!(e.contains("sshd (false) failed"), "{e}");
        assert!(run_quiet(&hosts(&["sh", "-c", "echo nope >&2; exit 2"])).unwrap_err().contains("nope"));
    }
}
