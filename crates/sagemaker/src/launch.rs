//! Planning the job's processes: one per GPU on every host, started by the
//! leader (hosts[0]) with one `mpirun` across all hosts, which reaches the
//! workers over ssh. Everything here is a pure function of the job's settings,
//! the device directory and the environment, so the exact `mpirun` command is
//! unit-tested for a fake two-host job.

use std::fmt;
use std::path::Path;

use crate::resource::ResourceConfig;

/// Set (to 1) in every process that `mpirun` starts: it trains as one rank
/// instead of launching the job again.
pub const RANK_ENV: &str = "TRAINER_SAGEMAKER_RANK";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One process on the leader trains; no launcher.
    InProcess,
    /// The leader runs `mpirun` with processes_per_host ranks on every host.
    Mpirun,
}

/// What this container's `trainer` process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// hosts[0]: trains itself or starts `mpirun`, then tells the workers the job ended.
    Leader,
    /// Any other host: serves sshd for the leader's `mpirun`, then waits for the job's end.
    Worker,
    /// A process started by `mpirun`: trains as one rank.
    Rank,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    pub hosts: Vec<String>,
    pub current_host: String,
    pub processes_per_host: usize,
    pub mode: Mode,
}

impl LaunchPlan {
    /// `gpus` is this host's GPU count (every host of a job has the same
    /// instance type); `processes_per_host` the hyperparameter, if given.
    pub fn new(resources: &ResourceConfig, processes_per_host: Option<usize>, gpus: usize) -> LaunchPlan {
        let ppn = processes_per_host.unwrap_or(gpus.max(1));
        let hosts = resources.hosts.clone();
        let mode = if hosts.len() * ppn == 1 { Mode::InProcess } else { Mode::Mpirun };
        LaunchPlan { hosts, current_host: resources.current_host.clone(), processes_per_host: ppn, mode }
    }

    pub fn world_size(&self) -> usize {
        match self.mode {
            Mode::InProcess => 1,
            Mode::Mpirun => self.hosts.len() * self.processes_per_host,
        }
    }

    pub fn multi_host(&self) -> bool {
        self.hosts.len() > 1
    }

    pub fn leader(&self) -> &str {
        &self.hosts[0]
    }

    pub fn workers(&self) -> &[String] {
        &self.hosts[1..]
    }

    /// `in_rank`: this process was started by `mpirun` (see [`is_rank_process`]).
    pub fn role(&self, in_rank: bool) -> Role {
        if in_rank {
            Role::Rank
        } else if self.current_host == self.hosts[0] {
            Role::Leader
        } else {
            Role::Worker
        }
    }
}

/// Whether the environment marks a process that `mpirun` started for this job.
pub fn is_rank_process(env: &[(String, String)]) -> bool {
    env.iter().any(|(k, v)| k == RANK_ENV && v == "1")
}

/// GPUs visible in this container: /dev/nvidia0, /dev/nvidia1, ... (the
/// NVIDIA container runtime exposes only the GPUs given to the container;
/// /dev/nvidiactl and /dev/nvidia-uvm are not GPUs).
pub fn gpu_count(dev: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dev) else { return 0 };
    rd.flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix("nvidia").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .count()
}

/// Whether the host has Elastic Fabric Adapter devices (p4d, p5, ...):
/// SageMaker exposes them as /dev/infiniband/uverbs*.
pub fn efa_present(dev: &Path) -> bool {
    std::fs::read_dir(dev.join("infiniband"))
        .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().starts_with("uverbs")))
        .unwrap_or(false)
}

/// An environment variable for every rank: `-x NAME=VALUE`, or `-x NAME`
/// to pass the launcher's own value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    pub name: String,
    pub value: Option<String>,
}

impl fmt::Display for EnvVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Variables of the launcher's environment that every rank gets as they are:
/// the job's settings for NCCL, libfabric (EFA), CUDA and us, and what finds
/// the programs and libraries (ssh'd processes start with a bare environment).
const FORWARD_PREFIXES: [&str; 5] = ["NCCL_", "FI_", "RDMAV_", "CUDA_", "TRAINER_"];
const FORWARD_NAMES: [&str; 6] =
    ["PATH", "LD_LIBRARY_PATH", "SAGEMAKER_BASE_DIR", "HOME", "RUST_BACKTRACE", "RUST_LOG"];

/// The environment of the ranks: the rank marker; NCCL_SOCKET_IFNAME on the
/// job's interface; with EFA, libfabric's EFA provider with GPUDirect RDMA;
/// then the launcher's own variables of [`FORWARD_PREFIXES`]/[`FORWARD_NAMES`].
/// A variable the job sets itself (Estimator `environment=`) wins over our
/// default. Sorted by name after the defaults, so the command is stable.
pub fn forwarded_env(env: &[(String, String)], interface: Option<&str>, efa: bool) -> Vec<EnvVar> {
    let has = |name: &str| env.iter().any(|(k, _)| k == name);
    let mut out = vec![EnvVar { name: RANK_ENV.into(), value: Some("1".into()) }];
    let mut defaults: Vec<(&str, String)> = Vec::new();
    if let Some(iface) = interface {
        defaults.push(("NCCL_SOCKET_IFNAME", iface.into()));
    }
    if efa {
        defaults.push(("FI_PROVIDER", "efa".into()));
        defaults.push(("FI_EFA_USE_DEVICE_RDMA", "1".into()));
        // libfabric with fork(): the trainer never forks after NCCL starts, but mpirun's daemons do.
        defaults.push(("RDMAV_FORK_SAFE", "1".into()));
    }
    for (name, value) in defaults {
        if !has(name) {
            out.push(EnvVar { name: name.into(), value: Some(value) });
        }
    }
    let mut passed: Vec<&str> = env
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| *k != RANK_ENV)
        .filter(|k| FORWARD_NAMES.contains(k) || FORWARD_PREFIXES.iter().any(|p| k.starts_with(p)))
        .collect();
    passed.sort_unstable();
    passed.dedup();
    out.extend(passed.into_iter().map(|k| EnvVar { name: k.into(), value: None }));
    out
}

#[derive(Debug, Clone)]
pub struct MpirunSpec<'a> {
    pub mpirun: &'a str,
    pub hosts: &'a [String],
    pub slots_per_host: usize,
    /// The hosts' network interface (resourceconfig.json's network_interface_name).
    pub network_interface: Option<&'a str>,
    pub env: &'a [EnvVar],
    /// The rank's command line: the trainer and its arguments.
    pub program: &'a [String],
}

/// ssh options for mpirun's and our own connections between the job's
/// hosts: never prompt, and accept the hosts' keys (every host of the job runs
/// the same image, whose keys are generated at build time).
pub const SSH_OPTIONS: [&str; 10] = [
    "-o",
    "BatchMode=yes",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "ConnectTimeout=30",
    "-o",
    "LogLevel=ERROR",
];

/// The `mpirun` command line (OpenMPI 4).
pub fn mpirun_command(spec: &MpirunSpec<'_>) -> Vec<String> {
    let n = spec.hosts.len() * spec.slots_per_host;
    // One host: no ssh at all, whatever the container's host name is.
    let host_list = if spec.hosts.len() == 1 {
        format!("localhost:{}", spec.slots_per_host)
    } else {
        spec.hosts.iter().map(|h| format!("{h}:{}", spec.slots_per_host)).collect::<Vec<_>>().join(",")
    };
    let mut c: Vec<String> = vec![
        spec.mpirun.into(),
        "--allow-run-as-root".into(),
        // "[1,3]<stdout>:" before every line: which rank said what. Metric regexes are not anchored for it.
        "--tag-output".into(),
        "-np".into(),
        n.to_string(),
        "--host".into(),
        host_list,
        // Ranks fill a host before the next: rank 0 is on the leader, local ranks are consecutive.
        "--map-by".into(),
        "slot".into(),
        "--bind-to".into(),
        "none".into(),
        // MPI carries only bootstrap and small messages (NCCL carries the gradients): plain TCP.
        "--mca".into(),
        "pml".into(),
        "ob1".into(),
        "--mca".into(),
        "btl".into(),
        "self,vader,tcp".into(),
    ];
    if spec.hosts.len() > 1 {
        // The leader starts a daemon on every worker itself; workers never ssh to each other.
        c.extend(["--mca", "plm_rsh_no_tree_spawn", "1"].map(String::from));
        c.extend(["--mca".into(), "plm_rsh_args".into(), SSH_OPTIONS.join(" ")]);
        if let Some(iface) = spec.network_interface {
            c.extend(["--mca", "btl_tcp_if_include", iface, "--mca", "oob_tcp_if_include", iface].map(String::from));
        }
    }
    for v in spec.env {
        c.push("-x".into());
        c.push(v.to_string());
    }
    c.extend(spec.program.iter().cloned());
    c
}

/// `s` quoted for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The command that tells a worker the job ended with `status`: writes
/// `done_file` on `host` (under a temporary name, then renamed, so the
/// worker never reads half a number).
pub fn done_command(ssh: &str, host: &str, done_file: &Path, status: i32) -> Vec<String> {
    let f = done_file.display().to_string();
    let dir = done_file.parent().map_or_else(|| "/".to_string(), |d| d.display().to_string());
    let tmp = format!("{f}.tmp");
    let remote = format!(
        "mkdir -p {} && printf '%s\\n' {status} > {} && mv -f {} {}",
        sh_quote(&dir),
        sh_quote(&tmp),
        sh_quote(&tmp),
        sh_quote(&f)
    );
    let mut c = vec![ssh.to_string()];
    c.extend(SSH_OPTIONS.iter().map(|s| s.to_string()));
    c.push(host.into());
    c.push(remote);
    c
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn two_hosts(current: &str) -> ResourceConfig {
        ResourceConfig::parse(
            &format!(
                r#"{{"current_host": "{current}", "hosts": ["algo-1", "algo-2"], "network_interface_name": "eth0"}}"#
            ),
            "rc.json",
        )
        .unwrap()
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn processes_default_to_the_gpu_count() {
        let rc = two_hosts("algo-1");
        let p = LaunchPlan::new(&rc, None, 8);
        assert_eq!((p.mode, p.processes_per_host, p.world_size()), (Mode::Mpirun, 8, 16));
        assert_eq!(p.role(false), Role::Leader);
        assert_eq!(p.role(true), Role::Rank);
        assert_eq!(LaunchPlan::new(&two_hosts("algo-2"), None, 8).role(false), Role::Worker);
        let p = LaunchPlan::new(&rc, Some(2), 8);
        assert_eq!(p.world_size(), 4);
        // No GPU: one process per host.
        assert_eq!(LaunchPlan::new(&rc, None, 0).world_size(), 2);
        let one = ResourceConfig::single_host();
        let p = LaunchPlan::new(&one, None, 1);
        assert_eq!((p.mode, p.world_size()), (Mode::InProcess, 1));
    }

    #[test]
    fn devices_counted_from_dev() {
        let d = tempfile::tempdir().unwrap();
        for name in ["nvidia0", "nvidia1", "nvidia7", "nvidiactl", "nvidia-uvm", "nvidia-caps", "null"] {
            std::fs::write(d.path().join(name), b"").unwrap();
        }
        assert_eq!(gpu_count(d.path()), 3);
        assert_eq!(gpu_count(&d.path().join("nope")), 0);
        assert!(!efa_present(d.path()));
        std::fs::create_dir(d.path().join("infiniband")).unwrap();
        std::fs::write(d.path().join("infiniband/uverbs0"), b"").unwrap();
        assert!(efa_present(d.path()));
    }

    #[test]
    fn rank_environment() {
        assert!(is_rank_process(&env(&[(RANK_ENV, "1")])));
        assert!(!is_rank_process(&env(&[("OMPI_COMM_WORLD_RANK", "0")])));
    }

    #[test]
    fn forwarded_environment() {
        let e = env(&[
            ("PATH", "/usr/bin"),
            ("NCCL_DEBUG", "INFO"),
            ("FI_PROVIDER", "tcp"),
            ("HOSTNAME", "algo-1"),
            ("SM_HOSTS", "[]"),
            ("TRAINER_KERNEL_CACHE", "/tmp/k"),
        ]);
        let vars: Vec<String> = forwarded_env(&e, Some("eth0"), true).iter().map(|v| v.to_string()).collect();
        assert_eq!(
            vars,
            [
                "TRAINER_SAGEMAKER_RANK=1",
                "NCCL_SOCKET_IFNAME=eth0",
                "FI_EFA_USE_DEVICE_RDMA=1",
                "RDMAV_FORK_SAFE=1",
                // the job's own FI_PROVIDER wins over our efa default
                "FI_PROVIDER",
                "NCCL_DEBUG",
                "PATH",
                "TRAINER_KERNEL_CACHE",
            ]
        );
    }

    #[test]
    fn mpirun_for_two_hosts() {
        let hosts = vec!["algo-1".to_string(), "algo-2".to_string()];
        let env = forwarded_env(&env(&[("PATH", "/usr/bin")]), Some("eth0"), false);
        let program = vec!["/usr/local/bin/trainer".to_string(), "train".into()];
        let spec = MpirunSpec {
            mpirun: "mpirun",
            hosts: &hosts,
            slots_per_host: 8,
            network_interface: Some("eth0"),
            env: &env,
            program: &program,
        };
        let cmd = mpirun_command(&spec).join(" ");
        assert_eq!(
            cmd,
            "mpirun --allow-run-as-root --tag-output -np 16 --host algo-1:8,algo-2:8 --map-by slot \
             --bind-to none --mca pml ob1 --mca btl self,vader,tcp --mca plm_rsh_no_tree_spawn 1 \
             --mca plm_rsh_args -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             -o ConnectTimeout=30 -o LogLevel=ERROR --mca btl_tcp_if_include eth0 --mca oob_tcp_if_include eth0 \
             -x TRAINER_SAGEMAKER_RANK=1 -x NCCL_SOCKET_IFNAME=eth0 -x PATH /usr/local/bin/trainer train"
        );
        // plm_rsh_args is one argument.
        let argv = mpirun_command(&spec);
        let i = argv.iter().position(|a| a == "plm_rsh_args").unwrap();
        assert!(argv[i + 1].starts_with("-o BatchMode=yes"));

        let one = vec!["algo-1".to_string()];
        let cmd = mpirun_command(&MpirunSpec { hosts: &one, ..spec }).join(" ");
        assert!(cmd.contains("-np 8 --host localhost:8") && !cmd.contains("plm_rsh"), "{cmd}");
    }

    #[test]
    fn done_command_quotes_the_path() {
        let c = done_command("ssh", "algo-2", Path::new("/tmp/it's/done"), 3);
        assert_eq!(c[0], "ssh");
        assert_eq!(c[c.len() - 2], "algo-2");
        assert_eq!(
            c[c.len() - 1],
            r"mkdir -p '/tmp/it'\''s' && printf '%s\n' 3 > '/tmp/it'\''s/done.tmp' && mv -f '/tmp/it'\''s/done.tmp' '/tmp/it'\''s/done'"
        );
        // The remote command runs in a POSIX shell: check it does what it says.
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x y/done");
        let c = done_command("ssh", "h", &f, 0);
        let ok = std::process::Command::new("sh").arg("-c").arg(c.last().unwrap()).status().unwrap();
        assert!(ok.success());
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "0\n");
    }
}
